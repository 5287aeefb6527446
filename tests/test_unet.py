"""UNet: parity with diffusers' UNet2DModel / UNet2DConditionModel and with original SD single files, round trips,
compile, published parameter counts, input errors."""

import re
import time

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

from diffusekit.checkpoints import CheckpointError, from_pretrained, load_weights, save_pretrained
from diffusekit.models import build
from diffusekit.interop.diffusers_unet import load_diffusers_unet, unet_config_from_diffusers, unet_state_from_diffusers
from diffusekit.interop.ldm_unet import PREFIX, unet_state_from_ldm
from diffusekit.models.unet import UNet, UNetConfig, sd15_unet_config, sdxl_unet_config

B, S, CTX = 2, 16, 32
TINY = dict(sample_size=S, block_out_channels=(32, 64), norm_num_groups=8)
COND = dict(TINY, cross_attention_dim=CTX)
SD1 = dict(COND, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2)
SDXL = dict(COND, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=1, attention_head_dim=(2, 4),
            use_linear_projection=True, transformer_layers_per_block=(1, 2), addition_embed_type="text_time",
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8)
CASES = {  # name: (diffusers class, config)
    "pixel_attention": (UNet2DModel, dict(TINY, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                          up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)),
    "pixel_class_scale_shift": (UNet2DModel, dict(TINY, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                                  up_block_types=("UpBlock2D", "AttnUpBlock2D"), num_class_embeds=5,
                                                  attention_head_dim=None, resnet_time_scale_shift="scale_shift",
                                                  attn_norm_num_groups=8, flip_sin_to_cos=False, freq_shift=1,
                                                  downsample_padding=0, norm_eps=1e-6)),
    "sd1": (UNet2DConditionModel, SD1),
    "sd2": (UNet2DConditionModel, dict(COND, down_block_types=("CrossAttnDownBlock2D",) * 2,
                                       up_block_types=("CrossAttnUpBlock2D",) * 2, layers_per_block=1,
                                       attention_head_dim=(2, 4), use_linear_projection=True)),
    "sdxl": (UNet2DConditionModel, SDXL),
    "class_labels": (UNet2DConditionModel, dict(SD1, num_class_embeds=10)),
    "inpaint_concat": (UNet2DConditionModel, dict(SD1, in_channels=9)),
}


def randomised(cls, config):
    """A diffusers UNet whose every parameter (zero-initialised ones too) is random."""
    torch.manual_seed(0)
    model = cls(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def ours_from(ref) -> UNet:
    config = unet_config_from_diffusers(dict(ref.config))
    state = unet_state_from_diffusers(ref.state_dict(), config)
    return load_weights(build("unet", config, device="meta"), state).eval()


def inputs(ref):
    """(x, t, diffusers kwargs, our kwargs) with fractional t, for a diffusers model's config."""
    cfg, g = ref.config, torch.Generator().manual_seed(1)
    x = torch.randn(B, 4 if cfg.in_channels == 9 else cfg.in_channels, S, S, generator=g)
    t = torch.tensor([10.5, 731.25])  # fractional timesteps
    theirs, ours = {}, {}
    if cfg.get("num_class_embeds"):
        theirs["class_labels"] = ours["class_labels"] = torch.tensor([1, 4])
    if "cross_attention_dim" in cfg:
        theirs["encoder_hidden_states"] = ours["context"] = torch.randn(B, 7, CTX, generator=g)
    if cfg.get("addition_embed_type") == "text_time":
        ours["pooled"] = torch.randn(B, 16, generator=g)
        ours["time_ids"] = torch.tensor([[16.0, 16, 0, 0, 16, 16], [32, 24, 4, 2, 16, 16]])
        theirs["added_cond_kwargs"] = dict(text_embeds=ours["pooled"], time_ids=ours["time_ids"])
    if cfg.in_channels == 9:
        ours["concat"] = torch.randn(B, 5, S, S, generator=g)
    return x, t, theirs, ours


def reference(ref, x, t, theirs, ours):
    x = torch.cat([x, ours["concat"]], dim=1) if "concat" in ours else x
    return ref(x, t, **theirs).sample


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_parity_with_diffusers(case):
    ref = randomised(*CASES[case])
    ours = ours_from(ref)
    x, t, theirs, kw = inputs(ref)
    expected, got = reference(ref, x, t, theirs, kw), ours(x, t, **kw)
    assert got.shape == expected.shape and expected.abs().max() > 0.5
    assert (got - expected).abs().max() < 1e-4


def test_conditions_matter():
    """Each condition of the SDXL-like UNet changes its output (so parity above is not vacuous)."""
    ref = randomised(*CASES["sdxl"])
    ours, (x, t, _, kw) = ours_from(ref), inputs(ref)
    with torch.no_grad():
        base = ours(x, t, **kw)
        for name in ("context", "pooled", "time_ids"):
            assert (ours(x, t, **{**kw, name: kw[name] + 1}) - base).abs().max() > 1e-3, name


@torch.no_grad()
def test_diffusers_folder_and_round_trip(tmp_path):
    ref = randomised(*CASES["sdxl"])
    ref.save_pretrained(tmp_path / "unet")
    ours = load_diffusers_unet(tmp_path / "unet").eval()
    x, t, theirs, kw = inputs(ref)
    assert (ours(x, t, **kw) - reference(ref, x, t, theirs, kw)).abs().max() < 1e-4
    again = from_pretrained(save_pretrained(ours, tmp_path / "ours")).eval()
    assert again.config == ours.config
    assert torch.equal(again(x, t, **kw), ours(x, t, **kw))


@torch.no_grad()
def test_legacy_attention_names():
    """Old diffusers checkpoints (e.g. google/ddpm-*) store query / key / value / proj_attn."""
    ref = randomised(*CASES["pixel_attention"])
    legacy = {re.sub(r"\.to_([qkv])\.", lambda m: "." + {"q": "query", "k": "key", "v": "value"}[m[1]] + ".",
                     k.replace(".to_out.0.", ".proj_attn.")): v for k, v in ref.state_dict().items()}
    assert any(".proj_attn." in k for k in legacy)
    config = unet_config_from_diffusers(dict(ref.config))
    ours = load_weights(build("unet", config, device="meta"), unet_state_from_diffusers(legacy, config)).eval()
    x, t, theirs, kw = inputs(ref)
    assert (ours(x, t, **kw) - reference(ref, x, t, theirs, kw)).abs().max() < 1e-4


def test_mismatched_checkpoint_names_keys():
    ref = randomised(*CASES["sd1"])
    config = unet_config_from_diffusers(dict(ref.config))
    sd = dict(ref.state_dict())
    del sd["down_blocks.0.resnets.1.time_emb_proj.weight"]
    sd["down_blocks.0.resnets.1.mystery.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"input_blocks\.1\.res\.emb_proj\.weight.*mystery"):
        load_weights(build("unet", config, device="meta"), unet_state_from_diffusers(sd, config))
    sd = dict(ref.state_dict())
    del sd["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight"]  # an incomplete q/k/v group
    with pytest.raises(CheckpointError, match=r"attn1\.qkv\.weight"):
        load_weights(build("unet", config, device="meta"), unet_state_from_diffusers(sd, config))


@pytest.mark.parametrize("option", [dict(time_cond_proj_dim=16), dict(class_embed_type="timestep"),
                                    dict(mid_block_type=None), dict(down_block_types=["SkipDownBlock2D"] * 2)])
def test_unsupported_diffusers_options_are_named(option):
    cfg = {**SD1, "_class_name": "UNet2DConditionModel", **option}
    with pytest.raises(ValueError, match=re.escape(next(iter(option)))):
        unet_config_from_diffusers(cfg)


def to_ldm(sd: dict, config: UNetConfig) -> dict:
    """Test-local diffusers -> original SD (LDM) key mapping, checked against diffusers' own converter."""
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    top = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "conv_norm_out": "out.0",
           "time_embedding.linear_2": "time_embed.2", "conv_out": "out.2", "class_embedding": "label_emb",
           "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
           "mid_block.resnets.1": "middle_block.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2"}
    n, levels = config.num_res_blocks, len(config.channel_mult)
    out = {}
    for key, v in sd.items():
        key = re.sub(r"(resnets\.\d+\.)(\w+)", lambda m: m[1] + res[m[2]], key)
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            side, level, kind, j, local = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if side == "down":
                i = 1 + level * (n + 1) + (n if kind == "downsamplers" else j)
                part = {"resnets": "0.", "attentions": "1.", "downsamplers": "0.op."}[kind]
                key = f"input_blocks.{i}.{part}{local.removeprefix('conv.')}"
            else:
                has_attn = levels - 1 - level in config.attention_levels
                i = level * (n + 1) + (n if kind == "upsamplers" else j)
                part = {"resnets": "0.", "attentions": "1.", "upsamplers": f"{1 + has_attn}."}[kind]
                key = f"output_blocks.{i}.{part}{local}"
        else:
            key = next((new + key[len(old):] for old, new in top.items() if key.startswith(old + ".")), key)
        out[PREFIX + key] = v
    return out


@pytest.mark.parametrize("case", ["class_labels", "sdxl"])
@torch.no_grad()
def test_ldm_single_file(case):
    ref = randomised(*CASES[case])
    config = unet_config_from_diffusers(dict(ref.config))
    ldm = {**to_ldm(ref.state_dict(), config), "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}
    back = convert_ldm_unet_checkpoint(ldm, dict(ref.config))
    assert back.keys() == ref.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
    ours = load_weights(build("unet", config, device="meta"), unet_state_from_ldm(ldm, config)).eval()
    x, t, theirs, kw = inputs(ref)
    assert (ours(x, t, **kw) - reference(ref, x, t, theirs, kw)).abs().max() < 1e-4


@torch.no_grad()
def test_compile_fullgraph():
    model = tiny(num_classes=3, addition_time_embed_dim=4, addition_embed_dim=6 + 6 * 4, in_channels=6)
    kw = dict(context=torch.randn(2, 5, 8), class_labels=torch.tensor([0, 2]), pooled=torch.randn(2, 6),
              time_ids=torch.randn(2, 6), concat=torch.randn(2, 2, 8, 8))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3.5, 999.0])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, t, **kw), model(x, t, **kw))


@pytest.mark.parametrize("make, count", [(sd15_unet_config, 859_520_964), (sdxl_unet_config, 2_567_463_684)])
def test_published_parameter_counts(make, count):
    start = time.perf_counter()
    model = build("unet", make(), device="meta")
    assert time.perf_counter() - start < 5
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.downsample_factor == (8 if make is sd15_unet_config else 4)


def tiny(**kw) -> UNet:
    base = dict(in_channels=4, out_channels=4, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                attention_levels=(1,), num_heads=2, context_dim=8, norm_groups=4)
    return UNet(UNetConfig(**{**base, **kw})).eval()


@torch.no_grad()
def test_null_class_learned_sigma_and_concat():
    model = tiny(num_classes=3, null_class=True, learned_sigma=True, in_channels=6)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    labels = torch.tensor([3, 0])  # 3 = the null class
    out = model(x, torch.tensor([3.7, 0.0]), context=ctx, class_labels=labels, concat=torch.randn(2, 2, 8, 8))
    assert out.shape == (2, 8, 8, 8)


@pytest.mark.parametrize("call, message", [
    (lambda m, x, c: m(x[..., :7, :], 1.0, context=c), "divisible"),
    (lambda m, x, c: m(x[:, :3], 1.0, context=c), "x and concat"),
    (lambda m, x, c: m(x, 1.0), "needs `context`"),
    (lambda m, x, c: m(x, 1.0, context=c[..., :4]), "context must be"),
    (lambda m, x, c: m(x, 1.0, context=c, class_labels=torch.tensor([0, 1])), "takes no `class_labels`"),
    (lambda m, x, c: m(x, 1.0, context=c, pooled=torch.randn(2, 4)), "pooled"),
])
def test_bad_inputs(call, message):
    with pytest.raises(ValueError, match=message):
        call(tiny(), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8))


def test_missing_labels_and_sdxl_conditions():
    x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match="needs `class_labels`"):
        tiny(num_classes=3)(x, 1.0, context=c)
    model = tiny(addition_time_embed_dim=4, addition_embed_dim=6 + 6 * 4)
    with pytest.raises(ValueError, match="pooled"):
        model(x, 1.0, context=c)
    with pytest.raises(ValueError, match="features expected"):
        model(x, 1.0, context=c, pooled=torch.randn(2, 5), time_ids=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="takes no `context`"):
        tiny(context_dim=None)(x, 1.0, context=c)
