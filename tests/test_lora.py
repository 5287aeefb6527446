"""LoRA files on a tiny SD 1.x-shaped pipeline: diffusers / PEFT and kohya files give what diffusers'
load_lora_weights + fuse_lora(lora_scale=s) gives, merged and unmerged; scale 0 and removal are bit-exact; bad
files are refused naming the layer, with the model unchanged."""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from diffusekit.cli import main
from diffusekit.images import png_text, read_parameters
from diffusekit.outputs import file_hash
from diffusekit.interop.lora import LoRAError, kohya_module, read_lora
from diffusekit.pipelines.foreign import load_diffusers_pipeline
from diffusekit.pipelines.lora import LoRAs

from .test_autoencoder import max_diff
from .test_outputs import fails, pixels
from .test_interop import _one_thread, tiny_sd_folder  # noqa: F401  (the fixture runs these tests on one thread)
from .test_unet import inputs as unet_inputs

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2")  # attention, SD 1.x's conv proj_in, MLP
TEXT_TARGETS = ("q_proj", "v_proj", "fc1")
RANK, ALPHA, TEXT_RANK = 4, 8.0, 2
PROMPTS = ["a cat", "a dog and a cat"]


def lora_factors(unet, text_encoder) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """Random down / up factors for the attention, projection, MLP and resnet conv1 (LoCon) layers of a diffusers
    UNet and the q / v / fc1 layers of a CLIP text encoder, by (component, module name)."""
    g, out = torch.Generator().manual_seed(0), {}
    for component, model, targets, r in (("unet", unet, UNET_TARGETS, RANK),
                                         ("text_encoder", text_encoder, TEXT_TARGETS, TEXT_RANK)):
        for name, m in model.named_modules():
            if name.endswith(targets) or (component == "unet" and name.endswith("resnets.0.conv1")):
                w = m.weight
                out[component, name] = (0.1 * torch.randn(r, *w.shape[1:], generator=g),
                                        0.1 * torch.randn(w.shape[0], r, *[1] * (w.ndim - 2), generator=g))
    return out


def peft_file(path, factors) -> None:
    """diffusers' own layout: unet.<module>.lora_A/B.weight, the PEFT alphas in the metadata."""
    state = {f"{c}.{name}.lora_{ab}.weight": t for (c, name), f in factors.items() for ab, t in zip("AB", f)}
    meta = {}
    for c, r, alpha in (("unet", RANK, ALPHA), ("text_encoder", TEXT_RANK, 1.0)):  # as LoraConfig.to_dict() saves
        meta |= {f"{c}.r": r, f"{c}.lora_alpha": alpha, f"{c}.target_modules": [n for cc, n in factors if cc == c]}
    save_file(state, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})


def kohya_file(path, factors) -> None:
    """kohya / A1111's layout: lora_unet_<module with _>.lora_down/up.weight and .alpha."""
    state = {}
    for (c, name), (down, up) in factors.items():
        key = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[c] + name.replace(".", "_")
        state |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                  f"{key}.alpha": torch.tensor(ALPHA if c == "unet" else 1.0)}
    save_file(state, path)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder, parts = tiny_sd_folder(tmp_path_factory.mktemp("sd"), tmp_path_factory.mktemp("vocab") / "files")
    factors = lora_factors(parts["unet"], parts["text_encoder"])
    files = {"peft": folder / "peft.safetensors", "kohya": folder / "kohya.safetensors"}
    peft_file(files["peft"], factors)
    kohya_file(files["kohya"], factors)
    return folder, parts, files


def outputs(unet, encode, parts):
    """The UNet's prediction on fixed inputs and the prompts' token embeddings."""
    x, t, theirs, kw = unet_inputs(parts["unet"])
    return unet(x, t, **kw), encode(PROMPTS)


@torch.no_grad()
def diffusers_outputs(folder, file, scale: float):
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(file)
    ref.fuse_lora(lora_scale=scale)
    x, t, theirs, _ = unet_inputs(ref.unet)
    ids = ref.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    return ref.unet(x, t, **theirs).sample, ref.text_encoder(ids.input_ids).last_hidden_state


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
@torch.no_grad()
def test_lora_matches_diffusers_fuse(sd, fmt, scale):
    folder, parts, files = sd
    pipe = load_diffusers_pipeline(folder)
    plain = outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts)
    # diffusers 0.42 reads a kohya file's text-encoder attention layers into names transformers 5 drops (only the
    # MLP's load), so the text encoder's reference is always the PEFT file of the same factors
    want = diffusers_outputs(folder, files[fmt], scale)[0], diffusers_outputs(folder, files["peft"], scale)[1]
    for merge in (True, False):
        with LoRAs(pipe, [(files[fmt], scale)], merge=merge):
            got = outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts)
        for ours, theirs, base in zip(got, want, plain):
            assert max_diff(ours, theirs) < 1e-4
            if scale == 0:
                assert torch.equal(ours, base)  # no LoRA, bit-exactly
            else:
                assert max_diff(ours, base) > 1e-2  # the LoRA changes both networks
        assert all(torch.equal(a, b) for a, b in zip(outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts),
                                                     plain))  # removed: the model as it was, bit-exactly


@torch.no_grad()
def test_two_loras_and_changing_scales(sd):
    """Two files add up (merged); unmerged, the scales change between calls without touching the weights; with
    restore=False no originals are kept and the model keeps the LoRA."""
    folder, parts, files = sd
    pipe = load_diffusers_pipeline(folder)
    weights = {k: v.clone() for k, v in pipe.net.state_dict().items()}
    with LoRAs(pipe, [(files["peft"], 0.25), (files["kohya"], 0.5)]):
        both = outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts)
    with LoRAs(pipe, [(files["peft"], 0.75)]):
        one = outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts)
    assert all(max_diff(a, b) < 1e-5 for a, b in zip(both, one))  # the same layers: 0.25 + 0.5 = 0.75
    hooked = LoRAs(pipe, [(files["peft"], 0.75)], merge=False)
    assert all(max_diff(a, b) < 1e-5 for a, b in zip(outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts),
                                                     one))
    assert all(torch.equal(v, weights[k]) for k, v in pipe.net.state_dict().items())
    hooked.set_scales([0.0])
    assert torch.equal(outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts)[0],
                       pipe.net(*unet_inputs(parts["unet"])[:2], **unet_inputs(parts["unet"])[3]))
    hooked.remove()
    with LoRAs(pipe, [(files["peft"], 0.75)], restore=False) as kept:  # (the command line's: no originals kept)
        assert not kept.saved
        assert all(max_diff(a, b) < 1e-5 for a, b in zip(outputs(pipe.net, lambda p: pipe.text_encoder(p)[0], parts),
                                                         one))
    assert not all(torch.equal(v, weights[k]) for k, v in pipe.net.state_dict().items())  # the model keeps it
    with pytest.raises(ValueError, match="merge=False"):
        LoRAs(pipe, [(files["peft"], 1.0)]).set_scales([0.5])


def test_bad_lora_files(sd, tmp_path):
    folder, parts, files = sd
    pipe = load_diffusers_pipeline(folder)
    before = {k: v.clone() for k, v in pipe.net.state_dict().items()}
    save_file({"model.weight": torch.zeros(2, 2)}, tmp_path / "none.safetensors")
    with pytest.raises(LoRAError, match="no LoRA layers"):
        LoRAs(pipe, [(tmp_path / "none.safetensors", 1.0)])
    (tmp_path / "corrupt.safetensors").write_bytes(b"not a file")
    with pytest.raises(LoRAError, match="not a readable LoRA file"):
        read_lora(tmp_path / "corrupt.safetensors")
    state = load_file(files["kohya"])
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
    state[key] = torch.zeros(RANK, 7)  # made for a model of another width
    save_file(state, tmp_path / "wide.safetensors")
    with pytest.raises(LoRAError, match=r"down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q .*shape"):
        LoRAs(pipe, [(files["peft"], 1.0), (tmp_path / "wide.safetensors", 1.0)])
    sdxl = {"lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q.lora_down.weight": torch.zeros(RANK, 8),
            "lora_unet_input_blocks_7_1_transformer_blocks_3_attn1_to_q.lora_up.weight": torch.zeros(8, RANK)}
    save_file(sdxl, tmp_path / "sdxl.safetensors")
    with pytest.raises(LoRAError, match="input_blocks.7.1.transformer_blocks.3.attn1.to_q .*lacks"):
        LoRAs(pipe, [(tmp_path / "sdxl.safetensors", 1.0)])
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 8),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 2)},
              tmp_path / "te2.safetensors")
    with pytest.raises(LoRAError, match="text_encoder_2, which this model lacks"):
        LoRAs(pipe, [(tmp_path / "te2.safetensors", 1.0)])
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3)}, tmp_path / "half.safetensors")
    with pytest.raises(LoRAError, match="conv_in lacks its up factor"):
        read_lora(tmp_path / "half.safetensors")
    assert all(torch.equal(v, before[k]) for k, v in pipe.net.state_dict().items())  # nothing was changed


def lycoris_file(path, unet, kind: str, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    """A LyCORIS LoHa or LoKr file on an attention projection (linear), a resnet conv1 (3x3) and proj_in (SD 1.x's
    1x1 conv) of a diffusers UNet; returns each module's dW with its gain, computed as LyCORIS documents it (LoKr
    on a conv: w1 [o1, i1, 1, 1] (x) w2 [o2, i2, kh, kw])."""
    g, state, deltas, r = torch.Generator().manual_seed(1), {}, {}, 2

    def rand(*shape: int) -> torch.Tensor:
        return 0.3 * torch.randn(*shape, generator=g)

    for name, m in unet.named_modules():
        if not name.endswith(("attentions.0.transformer_blocks.0.attn1.to_q", "resnets.0.conv1", "attentions.0.proj_in")):
            continue
        w, key = m.weight, "lora_unet_" + name.replace(".", "_")
        (out, inn), kernel = w.shape[:2], w.shape[2:]
        if kind == "loha":
            f = {"hada_w1_a": rand(out, r), "hada_w1_b": rand(r, w[0].numel()), "hada_w2_a": rand(out, r),
                 "hada_w2_b": rand(r, w[0].numel())}
            delta = (alpha / r) * ((f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]))
        else:
            o1, i1 = 2, 2
            f = {"lokr_w1": rand(o1, i1)}
            if kernel == (3, 3):  # full factors: no alpha / r
                f["lokr_w2"] = rand(out // o1, inn // i1, *kernel)
                delta = torch.kron(f["lokr_w1"][:, :, None, None], f["lokr_w2"])
            else:
                f |= {"lokr_w2_a": rand(out // o1, r), "lokr_w2_b": rand(r, inn // i1 * math.prod(kernel))}
                w2 = (f["lokr_w2_a"] @ f["lokr_w2_b"]).reshape(out // o1, inn // i1, *kernel)
                delta = (alpha / r) * torch.kron(f["lokr_w1"].reshape(o1, i1, *[1] * len(kernel)), w2)
        state |= {f"{key}.{k}": v for k, v in f.items()} | {f"{key}.alpha": torch.tensor(alpha)}
        deltas[name] = delta.reshape(w.shape)
    save_file(state, path)
    return deltas


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@torch.no_grad()
def test_lycoris_loha_and_lokr(sd, tmp_path, kind):
    """LoHa and LoKr files, merged and unmerged, give the diffusers UNet with W += s dW computed by hand."""
    folder, parts, _ = sd
    deltas = lycoris_file(tmp_path / f"{kind}.safetensors", parts["unet"], kind)
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None).unet
    for name, d in deltas.items():
        ref.get_submodule(name).weight += 0.7 * d
    x, t, theirs, kw = unet_inputs(ref)
    want = ref(x, t, **theirs).sample
    pipe = load_diffusers_pipeline(folder)
    plain = pipe.net(x, t, **kw)
    for merge in (True, False):
        with LoRAs(pipe, [(tmp_path / f"{kind}.safetensors", 0.7)], merge=merge):
            got = pipe.net(x, t, **kw)
        assert max_diff(got, want) < 1e-4 and max_diff(got, plain) > 1e-2
    assert torch.equal(pipe.net(x, t, **kw), plain)
    state = load_file(tmp_path / f"{kind}.safetensors")
    broken = {k: v for k, v in state.items() if not k.endswith(("hada_w2_b", "lokr_w1"))}
    save_file(broken, tmp_path / "broken.safetensors")
    with pytest.raises(LoRAError, match="lacks its (hada_w2_b|lokr_w1 or lokr_w1_a) factor"):
        read_lora(tmp_path / "broken.safetensors")
    save_file({**state, next(iter(state)).rsplit(".", 1)[0] + ".hada_t1": torch.zeros(2, 2, 3, 3)},
              tmp_path / "tucker.safetensors")
    with pytest.raises(LoRAError, match="'hada_t1' layers .* are not read"):
        read_lora(tmp_path / "tucker.safetensors")


@pytest.mark.parametrize("kohya, dotted", [
    ("down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
     "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("mid_block_resnets_1_time_emb_proj", "mid_block.resnets.1.time_emb_proj"),
    ("up_blocks_2_attentions_1_proj_in", "up_blocks.2.attentions.1.proj_in"),
    ("input_blocks_4_1_transformer_blocks_0_ff_net_0_proj", "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj"),
    ("text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
    ("text_model_encoder_layers_0_mlp_fc2", "text_model.encoder.layers.0.mlp.fc2"),
    ("output_blocks_2_0_skip_connection", "output_blocks.2.0.skip_connection"),
])
def test_kohya_names(kohya, dotted):
    assert kohya_module(kohya) == dotted


def test_lora_from_the_command_line(sd, tmp_path, capsys):
    """--lora FILE:SCALE changes the images, scale 0 does not, the PNG records the LoRA and --from-png reruns it;
    a missing file or a bad scale is refused before loading anything."""
    folder, parts, files = sd
    base = ["sample", "--model", str(folder), "--prompt", "a cat", "--n", "1", "--steps", "2", "--dtype", "fp32"]

    def image(name: str, *extra: str):
        main([*base, *extra, "--out", str(tmp_path / f"{name}.png")])
        return pixels(tmp_path / name / "000.png")

    plain, zero, half = image("plain"), image("zero", "--lora", f"{files['kohya']}:0"), image(
        "half", "--lora", f"{files['peft']}:0.5")
    assert np.array_equal(plain, zero) and not np.array_equal(plain, half)
    assert read_parameters(tmp_path / "half" / "000.png")["lora"] == [f"{files['peft'].resolve()}:0.5"]
    infotext = png_text(tmp_path / "half" / "000.png")["parameters"]
    assert "<lora:peft:0.5>" in infotext and f'Lora hashes: "peft: {file_hash(files["peft"], body=True)[:12]}"' in infotext
    main(["sample", "--from-png", str(tmp_path / "half" / "000.png"), "--out", str(tmp_path / "again.png")])
    assert np.array_equal(pixels(tmp_path / "again" / "000.png"), half)
    for bad, message in ((str(tmp_path / "missing.safetensors"), "no LoRA file"), (f"{files['peft']}:inf", "scale")):
        assert message in fails([*base, "--lora", bad, "--out", str(tmp_path / "bad.png")], capsys)
    assert "do not combine" in fails([*base, "--lora", str(files["peft"]), "--compile"], capsys)
