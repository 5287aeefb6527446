"""Classifier guidance against the exact class posterior of Gaussian-mixture data (issue 23, part 1): at scale 1
it is Bayes' rule, the exact class-conditional denoiser; at scale 0 the unconditional one."""

import pytest
import torch

from diffusekit.guidance import CFG, ClassifierGuidance
from diffusekit.schedules import FlowSchedule, VPSchedule
from diffusekit.toy import GaussianMixture

from .conftest import gen

MEANS = torch.tensor([[1.5, 0.0, -0.5], [-1.0, 1.0, 0.5], [0.0, -1.5, 1.0]], dtype=torch.float64)
COVS = torch.stack([torch.diag(torch.tensor(v, dtype=torch.float64)) for v in ([0.3, 0.5, 0.2], [0.4, 0.2, 0.6],
                                                                              [0.5, 0.5, 0.3])])
DATA = GaussianMixture(MEANS, COVS, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
SCHEDULES = {"scaled_linear": VPSchedule.named("scaled_linear"), "flow": FlowSchedule(shift=3.0)}


def states(schedule, n=24):
    """Noisy states at times across the schedule, each sample with its own class."""
    t = torch.linspace(schedule.t_max * 0.98, schedule.t_max * 0.02, n, dtype=torch.float64)
    a, b = schedule.alpha_sigma(t)
    x = DATA.sample(n, gen(1)) * a[:, None] + b[:, None] * torch.randn(n, 3, generator=gen(2), dtype=torch.float64)
    return x, t, torch.arange(n) % 3


def exact_conditional(schedule, x, t, y):
    rows = [DATA.component(int(k)).denoiser(schedule)(x[i:i + 1], t[i:i + 1]) for i, k in enumerate(y)]
    return torch.cat([r.eps for r in rows]), torch.cat([r.x0 for r in rows])


def guided(schedule, scale, classifier=None):
    return ClassifierGuidance(DATA.denoiser(schedule), schedule, classifier or DATA.classifier(schedule), scale)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_scale_one_is_bayes_rule(name):
    schedule = SCHEDULES[name]
    x, t, y = states(schedule)
    p = guided(schedule, 1.0)(x, t, {"class_labels": y})
    eps, x0 = exact_conditional(schedule, x, t, y)
    assert torch.allclose(p.x0, x0, atol=1e-9, rtol=1e-9) and torch.allclose(p.eps, eps, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_scale_zero_is_the_unconditional_denoiser(name):
    schedule = SCHEDULES[name]
    x, t, y = states(schedule)
    p, q = guided(schedule, 0.0)(x, t, {"class_labels": y}), DATA.denoiser(schedule)(x, t)
    assert torch.equal(p.x0, q.x0) and torch.equal(p.eps, q.eps)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_negative_controls_fail(name):
    """Without b_t (eps - s grad), or with the sign flipped, the result is not the conditional denoiser."""
    schedule = SCHEDULES[name]
    x, t, y = states(schedule)
    _, x0 = exact_conditional(schedule, x, t, y)
    classifier = DATA.classifier(schedule)
    for wrong in (lambda x_, t_, c: -classifier(x_, t_, c),  # the sign
                  lambda x_, t_, c: classifier(x_, t_, c) / schedule.alpha_sigma(t_)[1].to(x_).clamp(min=1e-3)):
        p = guided(schedule, 1.0, wrong)(x, t, {"class_labels": y})
        assert (p.x0 - x0).abs().max() > 1e-2


def test_it_composes_with_cfg_as_a_wrapper():
    schedule = SCHEDULES["scaled_linear"]
    x, t, y = states(schedule, 6)
    plain = guided(schedule, 1.0)
    both = CFG(plain, 1.0, {"class_labels": y})  # (CFG at scale 1 is the wrapped denoiser)
    assert torch.equal(both(x, t, {"class_labels": y}).x0, plain(x, t, {"class_labels": y}).x0)


def test_the_bundled_noisy_classifier_guides_the_unconditional_mode(tmp_path):
    """--cfg 0 --classifier mnist_noisy: the bundled model's null class guided by the bundled noise-aware classifier
    toward the requested digits (judged by the shipped clean classifier), recorded in the PNG and rerun bit for bit."""
    import numpy as np
    from PIL import Image

    from diffusekit.cli import main
    from diffusekit.evaluation import class_accuracy, load_mnist_classifier
    from diffusekit.images import from_pil, read_parameters

    def digits(path):
        return from_pil([Image.open(p) for p in sorted(path.glob("*.png"))], 1)

    common = ["sample", "--labels", "0-9", "--n", "3", "--steps", "10", "--dtype", "fp32", "--cfg", "0"]
    main(common + ["--out", str(tmp_path / "none.png")])
    main(common + ["--classifier", "mnist_noisy", "--classifier-scale", "3", "--out", str(tmp_path / "cg.png")])
    labels = torch.arange(10).repeat_interleave(3)
    judge = load_mnist_classifier()
    guided_acc = class_accuracy(judge, digits(tmp_path / "cg"), labels)
    assert guided_acc > 0.6 and guided_acc > class_accuracy(judge, digits(tmp_path / "none"), labels) + 0.3
    assert read_parameters(tmp_path / "cg.png")["classifier"] == "mnist_noisy"
    main(["sample", "--from-png", str(tmp_path / "cg.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(Image.open(tmp_path / "cg.png")))


def test_classifier_guidance_needs_labels_and_the_models_schedule(tmp_path):
    from diffusekit.bundled import CLASSIFIERS, MODELS
    from diffusekit.checkpoints import from_pretrained, read_config, save_pretrained
    from diffusekit.pipelines import generate, load_classifier, load_pipeline

    pipe = load_pipeline(MODELS["mnist"])
    classifier = load_classifier(CLASSIFIERS["mnist_noisy"], pipe)
    with pytest.raises(ValueError, match="needs class labels"):
        generate(load_pipeline(MODELS["mnist_sr"]), 1, low_res=torch.zeros(1, 1, 14, 14), classifier=classifier)
    meta = read_config(CLASSIFIERS["mnist_noisy"])
    other = tmp_path / "other"
    save_pretrained(from_pretrained(CLASSIFIERS["mnist_noisy"]), other,
                    extra={"diffusion": {**meta["diffusion"], "schedule": "cosine"}})
    with pytest.raises(ValueError, match="another schedule"):
        load_classifier(other, pipe)


def test_train_classifier_command_writes_a_classifier_that_guides_the_model(tmp_path):
    from diffusekit.bundled import MODELS
    from diffusekit.checkpoints import read_config
    from diffusekit.cli import main

    out = tmp_path / "noisy"
    main(["train-classifier", "--model", "mnist", "--steps", "2", "--out", str(out)])
    meta = read_config(out)
    accuracy = meta["heldout_accuracy"]  # at 4 noise levels, from t = 0 up
    assert meta["diffusion"] == read_config(MODELS["mnist"])["diffusion"] and len(accuracy) == 4 and "t=0" in accuracy
    main(["sample", "--labels", "3", "--n", "1", "--steps", "2", "--cfg", "0", "--classifier", str(out),
          "--out", str(tmp_path / "cg.png")])
    assert (tmp_path / "cg.png").is_file()
