"""An SD-1.5-shaped diffusers pipeline folder with seeded random weights, for speed and memory benchmarks at
the scale users run (no real checkpoint exists offline): UNet2DConditionModel with SD-1.5's config (859.5M
parameters), AutoencoderKL with SD's (83.7M), a CLIP ViT-L/14 text encoder of the real size (123.1M: 12 layers,
768 wide, 49,408 tokens) with a CLIPTokenizer over a synthetic vocabulary of that size, and SD's PNDM-style
scaled_linear scheduler config (DPMSolverMultistepScheduler here, so both sides can run dpmpp_2m).

    python benchmarks/sd15_folder.py /tmp/sd15            # writes it once (4.3 GB of fp32 safetensors)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

CLIP_VOCAB = 49408


def synthetic_clip_tokenizer(folder: Path):
    """A CLIPTokenizer with CLIP's vocabulary size: the 256 byte symbols (alone and word-final), the special
    tokens, and filler words up to 49,408 entries; merges build the filler words, so prompts tokenise to words."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in ("a", "photo", "of", "cat", "dog", "red", "astronaut", "riding", "horse", "on", "the", "moon"):
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.append(parts[0])
    vocab = list(dict.fromkeys(vocab))
    vocab += [f"filler{i}</w>" for i in range(CLIP_VOCAB - 2 - len(vocab))] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def sd15_parts(seed: int = 0) -> dict:
    """The SD-1.5-shaped components with seeded random weights (diffusers' own initialisation)."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                        sample_size=512).eval()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", projection_dim=768, bos_token_id=CLIP_VOCAB - 2,
                                        eos_token_id=CLIP_VOCAB - 1, pad_token_id=CLIP_VOCAB - 1)).eval()
    scheduler = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                            num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=text, scheduler=scheduler)


def write_sd15_folder(folder: str | Path, seed: int = 0) -> Path:
    """Write (once: an existing folder with model_index.json is kept) the SD-1.5-shaped pipeline folder."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    parts = sd15_parts(seed)
    parts["tokenizer"] = synthetic_clip_tokenizer(folder / "tokenizer")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "safety_checker": [None, None], "feature_extractor": [None, None]}
    for name, obj in parts.items():
        obj.save_pretrained(folder / name)
        index[name] = [type(obj).__module__.split(".")[0], type(obj).__name__]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--seed", type=int, default=0)
    print(write_sd15_folder(ap.parse_args().folder, ap.parse_args().seed))
