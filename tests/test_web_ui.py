"""End-to-end tests of the web UI (diffusekit/web/index.html) in headless Chromium driven by Selenium, against
a live `diffusekit serve` app with the bundled MNIST model; results are checked through the JSON API."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("selenium")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.selenium_manager import SeleniumManager  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tests.live import call, live_server, wait  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromedriver")
NEW_JOB = """const [before, loaded] = arguments;  // a gallery card not in `before` (with its images loaded)
for (const c of document.querySelectorAll('#gallery .job')) {
  const imgs = [...c.querySelectorAll('img')];
  if (!before.includes(c.dataset.id) && (!loaded || imgs.length && imgs.every(i => i.complete && i.naturalWidth > 0)))
    return c.dataset.id;
}
return null;"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(models=("mnist",), outdir=tmp_path_factory.mktemp("serve")) as url:
        yield url


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})

    def offline(*args, **kw):
        raise AssertionError("selenium-manager was asked for a driver (it would try to download one)")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeleniumManager, "binary_paths", offline)
        d = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield d
    d.quit()


@pytest.fixture
def page(driver, server):
    return load(driver, server)


def load(d, server):
    """The page, freshly loaded, once the model menu and the gallery are filled in."""
    d.get(server)
    WebDriverWait(d, 20).until(lambda d: options(d, "model") and
                               len(d.find_elements(By.CSS_SELECTOR, "#gallery .job")) == len(jobs(server)))
    return d


def get(server, path):
    status, out = call(server + path)
    assert status == 200, out
    return out


def jobs(server):
    return get(server, "/api/jobs")["jobs"]


def png(server, path):
    return np.asarray(Image.open(io.BytesIO(get(server, path))).convert("L"))


def options(d, select_id):
    return [o.get_attribute("value") for o in Select(d.find_element(By.ID, select_id)).options]


def fill(d, **values):
    """Type values into inputs / choose them in selects, by element id."""
    for key, value in values.items():
        e = d.find_element(By.ID, key)
        if e.tag_name == "select":
            Select(e).select_by_value(str(value))
        else:
            e.clear()
            e.send_keys(str(value))


def js_errors(d):
    """SEVERE console entries other than failed requests (a 4xx answer is logged as one)."""
    return [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def generate(d, server, timeout=60):
    """Click Generate and wait for the job's gallery card with its images loaded; the finished job."""
    before = [j["id"] for j in jobs(server)]
    d.find_element(By.ID, "generate").click()

    def new_job(d):
        assert not (error := d.find_element(By.ID, "error")).is_displayed(), error.text
        return d.execute_script(NEW_JOB, before, True)

    return get(server, f"/api/jobs/{WebDriverWait(d, timeout).until(new_job)}")


def test_page_lists_models_and_samplers(page, server):
    info = get(server, "/api/models")
    assert options(page, "model") == [m["name"] for m in info["models"]] == ["mnist"]
    assert options(page, "sampler") == info["samplers"]
    assert Select(page.find_element(By.ID, "sampler")).first_selected_option.get_attribute("value") == "dpmpp_2m"
    assert options(page, "label") == [""] + [str(c) for c in range(10)]
    enabled = [o.get_attribute("value") for o in Select(page.find_element(By.ID, "task")).options if o.is_enabled()]
    assert enabled == ["sample", "img2img", "inpaint", "outpaint"]
    assert not page.find_element(By.ID, "prompt").is_displayed()  # a class-conditional model takes no prompt
    assert page.find_element(By.ID, "width").get_attribute("value") == "28"
    assert [e for e in page.get_log("browser") if e["level"] == "SEVERE"] == []


def test_upsample_guidance_defaults_to_the_auto_weight(page, server):
    assert page.find_element(By.ID, "ug-w").get_attribute("value") == "auto"
    page.find_element(By.ID, "ug").click()
    fill(page, label=3, steps=2, n=1, seed=5, width=56, height=56)
    job = generate(page, server)
    assert job["status"] == "done" and job["request"]["upsample_guidance"] == "auto"
    fill(page, **{"ug-w": 0.3})
    assert generate(page, server)["request"]["upsample_guidance"] == 0.3


def test_generate_shows_progress_and_lands_in_gallery(page, server):
    page.execute_script("""window.previews = [];
        new MutationObserver(() => window.previews.push(document.getElementById('preview').src))
            .observe(document.getElementById('preview'), {attributes: true, attributeFilter: ['src']});""")
    assert [page.find_element(By.ID, k).get_attribute("value") for k in ("cfg-until", "cache")] == ["1", "1"]
    fill(page, label=7, steps=8, n=2, seed=1234, **{"cfg-until": 0.5, "cache": 2})
    assert not page.find_element(By.ID, "random-seed").is_selected()  # typing a seed turns "random" off
    job = generate(page, server)
    assert job["status"] == "done" and job["request"]["labels"] == [7] and job["seed"] == 1234
    assert job["request"]["steps"] == 8 and len(job["images"]) == 2
    assert (job["request"]["cfg_until"], job["request"]["cache"]) == (0.5, 2)
    card = page.find_element(By.CSS_SELECTOR, f'#gallery .job[data-id="{job["id"]}"]')
    assert [i.get_attribute("src").split("/api/", 1)[1] for i in card.find_elements(By.TAG_NAME, "img")] == \
        [u.split("/api/", 1)[1] for u in job["images"]]
    assert page.find_element(By.CSS_SELECTOR, "#gallery .job").get_attribute("data-id") == job["id"]  # newest first
    previews = page.execute_script("return window.previews")
    assert any(p.startswith("data:image/png;base64,") for p in previews)  # the live preview
    assert previews[-1].endswith(job["grid"])  # then the result
    progress = page.find_element(By.ID, "progress")
    assert progress.get_attribute("max") == progress.get_attribute("value") == "8"

    fill(page, steps=9, label="", cache=1)  # "reuse seed/settings" on the result puts its settings back
    page.find_element(By.ID, "random-seed").click()
    card.find_element(By.TAG_NAME, "img").click()
    assert json.loads(page.find_element(By.ID, "params").text)["seed"] == 1234
    page.find_element(By.ID, "reuse-settings").click()
    assert [page.find_element(By.ID, k).get_attribute("value") for k in ("steps", "label", "seed", "n", "cache")] == \
        ["8", "7", "1234", "2", "2"]
    assert not page.find_element(By.ID, "random-seed").is_selected()
    assert js_errors(page) == []


def test_an_xyz_plot(page, server):
    """X and Y axes typed in the plot box run one sweep job: its plot is the result, every cell's images are in the
    gallery card, and reuse puts the axes back."""
    page.find_element(By.CSS_SELECTOR, "#sweep-box summary").click()
    assert options(page, "sweep-x")[:3] == ["", "cfg", "steps"]
    fill(page, label=3, steps=2, n=1, seed=5, **{"sweep-x": "cfg", "sweep-x-values": "1, 3",
                                                 "sweep-y": "sampler", "sweep-y-values": "ddim,euler"})
    job = generate(page, server)
    assert job["status"] == "done" and job["request"]["sweep"] == ["cfg=1, 3", "sampler=ddim,euler"]
    assert len(job["images"]) == 4 and job["total"] == 8 and job["parameters"]["sweep"] == ["cfg=1.0,3.0", "sampler=ddim,euler"]
    card = page.find_element(By.CSS_SELECTOR, f'#gallery .job[data-id="{job["id"]}"]')
    assert len(card.find_elements(By.TAG_NAME, "img")) == 4
    fill(page, **{"sweep-x": "", "sweep-y": ""})
    card.find_element(By.TAG_NAME, "img").click()
    page.find_element(By.ID, "reuse-settings").click()
    assert [page.find_element(By.ID, k).get_attribute("value") for k in ("sweep-x", "sweep-x-values", "sweep-y")] \
        == ["cfg", "1, 3", "sampler"]
    fill(page, **{"sweep-x": "", "sweep-y": ""})  # (the other tests run without a sweep)
    assert js_errors(page) == []


def source_as_input(page, server, label: int, seed: int) -> dict:
    """A finished 28x28 job of `label`, put in the page as the input image ("use as input" on its gallery card)."""
    status, source = call(server + "/api/jobs", {"model": "mnist", "labels": [label], "n": 1, "steps": 4, "seed": seed})
    assert status == 202, source
    source = wait(server, source["id"])
    load(page, server)
    page.find_element(By.CSS_SELECTOR, f'#gallery .job[data-id="{source["id"]}"] img').click()
    page.find_element(By.ID, "use-input").click()
    WebDriverWait(page, 10).until(lambda d: d.execute_script(
        "const i = document.getElementById('input-img'); return i.complete && i.naturalWidth === 28"))
    return source


def test_inpaint_keeps_the_unmasked_pixels(page, server):
    source = source_as_input(page, server, 3, 5)
    assert Select(page.find_element(By.ID, "task")).first_selected_option.get_attribute("value") == "img2img"
    fill(page, task="inpaint", steps=4, n=1, seed=99)
    canvas = page.find_element(By.ID, "mask-canvas")
    assert canvas.size == {"width": 280, "height": 280}  # the 28x28 input shown 10x
    page.execute_script("document.getElementById('brush').value = 40; arguments[0].scrollIntoView({block: 'center'})",
                        canvas)  # (actions aim at the centre of an element's visible part)
    stroke = ActionChains(page, duration=20).move_to_element_with_offset(canvas, -100, 0).click_and_hold()
    for _ in range(8):
        stroke.move_by_offset(25, 0)
    stroke.release().perform()  # a 40 px wide stroke across the middle: rows 12-15, columns ~4-23 natively

    job = generate(page, server)
    assert job["status"] == "done" and job["request"]["task"] == "inpaint"
    assert job["parameters"]["input_image"] and job["parameters"]["strength"] == 1.0
    mask = np.asarray(Image.open(job["parameters"]["mask"]).convert("L"))  # what the page sent, as saved
    assert mask.shape == (28, 28) and set(np.unique(mask)) == {0, 255}
    assert (mask[13:15, 6:22] == 255).all() and not mask[:11].any() and not mask[17:].any()
    inside = mask == 255
    before, after = png(server, source["images"][0]), png(server, job["images"][0])
    assert (after[~inside] == before[~inside]).all()
    assert (after[inside] != before[inside]).any()
    assert js_errors(page) == []


def test_outpaint_extends_the_canvas(page, server):
    """The outpaint task sends its sides and mask blur; the result is wider, the input kept beyond the seam."""
    source = source_as_input(page, server, 4, 6)
    fill(page, task="outpaint", steps=4, n=1, seed=9)
    assert page.find_element(By.ID, "outpaint-row").is_displayed()
    assert page.find_element(By.ID, "mask-blur").get_attribute("value") == "4"
    fill(page, **{"out-right": 8, "mask-blur": 1})
    job = generate(page, server)
    assert job["status"] == "done", job
    assert job["parameters"]["outpaint"] == "left=0,right=8,top=0,bottom=0" and job["parameters"]["mask_blur"] == 1
    before, after = png(server, source["images"][0]), png(server, job["images"][0])
    assert after.shape == (28, 36) and (after[:, :26] == before[:, :26]).all()
    assert js_errors(page) == []


def test_bad_request_shows_the_error(page, server):
    count, [mnist] = len(jobs(server)), get(server, "/api/models")["models"]
    assert not page.find_element(By.ID, "error").is_displayed()
    width = 14 * mnist["factor"] + 1
    fill(page, width=width, steps=4)
    page.find_element(By.ID, "generate").click()
    error = WebDriverWait(page, 10).until(lambda d: (e := d.find_element(By.ID, "error")).is_displayed() and e)
    assert "divisible" in error.text and str(width) in error.text
    assert len(jobs(server)) == count


def test_cancel_a_running_job(page, server):
    fill(page, label=7, steps=100, n=32)
    before = [j["id"] for j in jobs(server)]
    page.find_element(By.ID, "generate").click()
    cancel = page.find_element(By.ID, "cancel")
    WebDriverWait(page, 10).until(lambda d: cancel.is_enabled())
    [job] = [j for j in jobs(server) if j["id"] not in before]
    WebDriverWait(page, 10, 0.02).until(lambda d: int(d.find_element(By.ID, "progress").get_attribute("value")) > 0)
    cancel.click()
    job = wait(server, job["id"], timeout=20)
    assert job["status"] == "cancelled" and 0 < job["step"] < 100 and job["images"] == []
    WebDriverWait(page, 10).until(lambda d: d.execute_script(NEW_JOB, before, False) == job["id"])
    assert "cancelled" in page.find_element(By.ID, "status").text
    assert js_errors(page) == []


@contextlib.contextmanager
def serving(driver, pipe, tmp_path):
    """The page of a live server of `pipe` alone (saved to a model folder), and its URL."""
    from diffusekit.pipelines import save_pipeline

    with live_server(models=(str(save_pipeline(pipe, tmp_path / "model")),), outdir=tmp_path / "serve") as url:
        yield load(driver, url), url


def test_a_painted_semantic_map_reaches_the_model_as_its_classes(driver, tmp_path):
    from diffusekit.data import MAP_CLASSES
    from diffusekit.images import load_map
    from tests.test_semantic_maps import map_pipeline

    with serving(driver, map_pipeline(), tmp_path) as (page, url):
        assert page.find_element(By.ID, "map-box").is_displayed()
        assert not page.find_element(By.ID, "label-row").is_displayed()
        buttons = page.find_elements(By.CSS_SELECTOR, "#map-classes button")
        assert [b.text for b in buttons] == list(MAP_CLASSES)
        buttons[MAP_CLASSES.index("red square")].click()
        canvas = page.find_element(By.ID, "map-canvas")
        assert canvas.size == {"width": 256, "height": 256}  # 32x32 shown 8x
        page.execute_script("document.getElementById('map-size').value = 6; arguments[0].scrollIntoView({block: "
                            "'center'})", canvas)
        ActionChains(page).move_to_element_with_offset(canvas, 0, 0).click().perform()  # a square of half-size 6
        fill(page, steps=2, n=1)
        job = generate(page, url)
        assert job["status"] == "done" and np.asarray(Image.open(io.BytesIO(get(url, job["images"][0])))).shape[:2] \
            == (32, 32)
        sent = load_map(job["parameters"]["map"], len(MAP_CLASSES))[0]  # what the page sent, as saved
        assert (sent[11:21, 11:21] == MAP_CLASSES.index("red square")).all()
        assert not sent[:9].any() and not sent[23:].any() and not sent[:, :9].any() and not sent[:, 23:].any()
        assert js_errors(page) == []


def test_a_typed_layout_reaches_the_model_and_a_bad_one_is_named(driver, tmp_path):
    from diffusekit.data import LAYOUT_CLASSES
    from tests.test_layouts import layout_pipeline

    with serving(driver, layout_pipeline(), tmp_path) as (page, url):
        assert page.find_element(By.ID, "layout-box").is_displayed()
        assert not page.find_element(By.ID, "map-box").is_displayed()
        assert all(name in page.find_element(By.ID, "layout-hint").text for name in LAYOUT_CLASSES)
        fill(page, layout="pink star 0 0 1 1", steps=2, n=1)
        page.find_element(By.ID, "generate").click()
        error = WebDriverWait(page, 20).until(lambda d: d.find_element(By.ID, "error").is_displayed() and
                                              d.find_element(By.ID, "error").text)
        assert "unknown layout class" in error and "pink star" in error
        layout = "red circle 0.1 0.1 0.4 0.4; blue square 0.5 0.6 0.9 1"
        fill(page, layout=layout)
        job = generate(page, url)
        assert job["status"] == "done" and job["parameters"]["layout"] == layout
        assert js_errors(page) == []


def test_loras_and_embeddings_from_the_served_folders(driver, tmp_path):
    """A text model served with LoRA and embedding folders: the page offers the LoRAs by name and lists the
    embeddings; the chosen LoRAs, with their scales, reach the job; reuse restores them; removing one drops it."""
    from safetensors.torch import save_file
    from tests.test_interop import tiny_sd_folder
    from tests.test_lora import lora_factors, peft_file

    folder, parts = tiny_sd_folder(tmp_path / "sd", tmp_path / "vocab" / "files")
    (tmp_path / "loras").mkdir(), (tmp_path / "embeddings").mkdir()
    for name in ("style", "detail"):
        peft_file(tmp_path / "loras" / f"{name}.safetensors", lora_factors(parts["unet"], parts["text_encoder"]))
    save_file({"emb_params": torch.randn(2, parts["text_encoder"].config.hidden_size)},
              tmp_path / "embeddings" / "sks.safetensors")
    with live_server(models=(str(folder),), outdir=tmp_path / "serve", dtype="fp32", lora_dir=tmp_path / "loras",
                     embedding_dir=tmp_path / "embeddings") as url:
        page = load(driver, url)
        assert page.find_element(By.ID, "lora-box").is_displayed() and options(page, "lora-name") == ["detail", "style"]
        assert "sks" in page.find_element(By.ID, "embeddings-hint").text
        fill(page, prompt="a sks cat", steps=2, n=1, **{"lora-name": "style", "lora-scale": 0.5})
        page.find_element(By.ID, "add-lora").click()
        fill(page, **{"lora-name": "detail", "lora-scale": 2})
        page.find_element(By.ID, "add-lora").click()
        assert [li.text.rstrip("×").strip() for li in page.find_elements(By.CSS_SELECTOR, "#loras li")] == [
            "style: 0.5", "detail: 2"]
        job = generate(page, url)
        assert job["status"] == "done" and job["request"]["lora"] == ["style:0.5", "detail:2"]
        assert [Path(s).name for s in job["parameters"]["lora"]] == ["style.safetensors:0.5", "detail.safetensors:2"]
        assert job["parameters"]["embedding"][0].endswith("sks.safetensors:sks")
        page.find_element(By.CSS_SELECTOR, "#loras li button").click()  # remove 'style'
        assert len(page.find_elements(By.CSS_SELECTOR, "#loras li")) == 1
        page.find_element(By.CSS_SELECTOR, "#gallery .job img").click()
        page.find_element(By.ID, "reuse-settings").click()
        assert len(page.find_elements(By.CSS_SELECTOR, "#loras li")) == 2
        assert js_errors(page) == []
