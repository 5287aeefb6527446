"""The autoencoder trainer of latent diffusion (SPEC §6; Rombach et al. 2022, Esser et al. 2021).

loss = L1(x, x_hat) [+ w_p LPIPS] + w_kl KL (KL model) or the codebook loss (VQ model)
       + lambda * w_d * adversarial hinge loss of a PatchGAN discriminator (from `disc_start` on),
with lambda the adaptive weight ||grad nll|| / ||grad g_loss|| at the decoder's last layer. At the end
the latent scaling factor is set to 1 / std of the latents of the data, so that diffusion sees unit
variance. Shares data order, checkpoints, logging and multi-process handling with the diffusion trainer.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoints import save_pretrained
from ..data import open_dataset
from ..models import build
from ..images import save_grid
from .config import AutoencoderTrainConfig
from .loop import Processes, Trainer, run
from .state import RunFolder


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): strided 4x4 convs -> one logit per overlapping patch."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            mods += [nn.Conv2d(ch, out, 4, 2 if i < layers else 1, 1, bias=False), nn.GroupNorm(1, out), nn.LeakyReLU(0.2)]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def perceptual_loss(device: torch.device) -> nn.Module | None:
    """LPIPS (Zhang et al. 2018) if the `lpips` package and its backbone weights are available locally,
    else None with a warning (no download is attempted)."""
    try:
        import lpips

        return lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)
    except Exception as e:  # missing package, or weights that would have to be downloaded
        warnings.warn(f"LPIPS perceptual loss unavailable ({type(e).__name__}: {e}); training with L1 + adversarial "
                      "+ KL only, which gives blurrier reconstructions. pip install 'diffusekit[lpips]' (with a "
                      "torchvision matching your torch, and its VGG16 weights in the torch hub cache) enables it")
        return None


def adaptive_weight(nll: Tensor, g_loss: Tensor, last: Tensor) -> Tensor:
    """lambda = ||d nll / d w_last|| / (||d g_loss / d w_last|| + 1e-4), clamped to [0, 1e4] (LDM)."""
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()


@torch.no_grad()
def estimate_scaling(ae: nn.Module, dataset, n: int, device: torch.device) -> float:
    """1 / std of the unscaled latents (posterior means, or VQ encodings) of the first n images."""
    images = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])
    z = torch.cat([ae.unscale(ae.to_latent(chunk.to(device))) for chunk in images.split(256)])
    return 1.0 / z.float().std().item()


def train_autoencoder(cfg: AutoencoderTrainConfig, resume: bool = True, force: bool = False) -> Path:
    """Train a KL or VQ autoencoder as configured; returns the model folder (with its scaling factor).
    `resume` and `force` as for the diffusion trainer."""
    procs = Processes.init(cfg.train.device)
    device, T, A = procs.device, cfg.train, cfg.autoencoder
    dataset = open_dataset(cfg.data, T.seed)
    torch.manual_seed(T.seed)
    ae = build(cfg.model.type, cfg.model.config, device=device)
    disc = PatchDiscriminator(ae.config.out_channels, A.disc_channels, A.disc_layers).to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=T.lr, betas=(0.5, 0.9), weight_decay=T.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=A.disc_lr, betas=(0.5, 0.9))
    generator = torch.Generator().manual_seed(T.seed)
    lpips = perceptual_loss(device) if A.perceptual_weight > 0 else None
    model = nn.parallel.DistributedDataParallel(ae) if procs.world > 1 else ae
    d_model = nn.parallel.DistributedDataParallel(disc) if procs.world > 1 else disc
    fixed = torch.stack([dataset[i]["image"] for i in range(8)]).to(device)

    def step(data: Iterator[dict[str, Any]], index: int) -> dict[str, Tensor]:
        x = procs.shard(next(data))["image"].to(device)
        return step_autoencoder(model, d_model, ae, lpips, x, cfg, index >= A.disc_start, opt, opt_d, generator)

    def export(path: Path) -> Path:
        """The model folder, with the latent scaling factor 1 / std measured on the current weights."""
        ae.eval()
        ae.config.scaling_factor = estimate_scaling(ae, dataset, A.scale_samples, device)
        ae.train()
        return save_pretrained(ae, path, extra={"image": {"resolution": [cfg.data.resolution] * 2,
                                                          "channels": cfg.data.channels}})

    trainer = Trainer({"model": ae, "disc": disc}, {"opt": opt, "opt_d": opt_d}, step,
                      lambda path: reconstruction_grid(ae, fixed, path), export, T.batch_size)
    with RunFolder(T.out_dir, procs.main) as folder:
        path = run(cfg, procs, folder, dataset, trainer, generator, resume, force, "training autoencoder")
    if procs.main:
        print(f"latent scaling factor 1 / std = {ae.config.scaling_factor:.4f}")
    return path


@torch.no_grad()
def reconstruction_grid(ae: nn.Module, fixed: Tensor, path: Path) -> Path:
    """Inputs above their reconstructions, as a PNG."""
    rec = ae.from_latent(ae.to_latent(fixed)).clamp(-1, 1)
    return save_grid(torch.cat([fixed, rec]), path, nrow=8, row_labels=["input", "recon"], scale=2)


def step_autoencoder(model: nn.Module, d_model: nn.Module, ae: nn.Module, lpips: nn.Module | None, x: Tensor,
                     cfg: AutoencoderTrainConfig, adversarial: bool, opt: torch.optim.Optimizer,
                     opt_d: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, Tensor]:
    """One generator step and (once adversarial) one discriminator step; returns the logged losses."""
    A = cfg.autoencoder
    if cfg.model.type == "autoencoder_kl":
        x_hat, posterior = model(x, generator)
        reg = A.kl_weight * posterior.kl().mean()
    else:
        x_hat, reg, _ = model(x)
    rec = (x - x_hat).abs().mean()
    nll = rec + (A.perceptual_weight * lpips(x_hat, x).mean() if lpips is not None else 0)
    loss, log = nll + reg, {"loss": rec.detach(), "reg": reg.detach()}
    if adversarial:
        g_loss = -d_model(x_hat).mean()
        weight = adaptive_weight(nll, g_loss, ae.decoder.conv_out.weight) * A.disc_weight
        loss = loss + weight * g_loss
        log.update(g_loss=g_loss.detach(), adaptive_weight=weight)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(ae.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
    opt.step()
    if adversarial:
        real, fake = d_model(x), d_model(x_hat.detach())
        d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        log["d_loss"] = d_loss.detach()
    return log
