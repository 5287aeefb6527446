"""SD-1.5 UNet forward: diffusekit against diffusers' UNet2DConditionModel holding the same (seeded random)
weights, side by side in one process, alternating round by round (issue 24.1 / 24.5).

Per (dtype, batch, latent size): each round times `--reps` forwards of each side; the ratio is the median over
rounds of t_diffusers / t_ours. FLOPs of one forward come from torch.utils.flop_counter (with the CPU's flash
attention counted), and the machine's matmul peak in that dtype is measured in the same run (a 4096^3 matmul,
best of 5), so each time is also given as achieved GFLOP/s and as a fraction of that peak. Outputs are compared
with diffusers' fp32 forward. bf16 runs only where the device computes it natively
(`diffusekit.acceleration.native_dtype`: AVX512-BF16 / AMX CPUs, CUDA); elsewhere it is emulated at a few
GFLOP/s and the row is skipped with the reason.

    python benchmarks/sd_unet_speed.py --threads 2 --batch 2 --size 64 --dtype fp32 bf16 --rounds 3
    python benchmarks/sd_unet_speed.py --threads 2 --batch 1 2 --size 64 96 --dtype bf16 --variants eager auto
    python benchmarks/sd_unet_speed.py --device cuda --batch 1 2 8 --dtype bf16 --variants eager compile graph
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffusekit.acceleration import accelerate, keep_freed_memory, native_dtype
from diffusekit.interop.diffusers_unet import unet_config_from_diffusers, unet_state_from_diffusers
from diffusekit.models.unet import UNet

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# flop_counter's formulas miss the CPU's flash attention kernel (245 of the SD-1.5 UNet's 1599 GFLOP at b2, 64x64)
COUNTED_TOO = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
               lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)}
VARIANTS = ["eager", "channels_last", "blocked", "auto", "compile", "graph"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: torch.device, reps: int = 1) -> float:
    """Seconds per call of the fastest of `reps` calls (after one warm-up call)."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 4096) -> float:
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / best_time(lambda: a @ b, device, 5)


def pair(device: torch.device):
    """diffusers' SD-1.5 UNet (seeded random init) and ours holding its weights, both fp32 and eval."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    theirs = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    config = unet_config_from_diffusers(dict(theirs.config))
    ours = UNet(config).eval()
    ours.load_state_dict(unet_state_from_diffusers(theirs.state_dict(), config))
    return ours.to(device), theirs.to(device)


def variant(net: torch.nn.Module, name: str, example: tuple) -> callable:
    """A forward callable of `net` (or of a converted copy): eager; channels_last; blocked (channels_last and
    prepacked convolution weights, `diffusekit.acceleration.prepack`); auto (what `accelerate`, hence `diffusekit
    --dtype`, chooses for this network, device and dtype); compile (inductor; freezing on the CPU) or graph (CUDA
    graph of the compiled forward, `mode="reduce-overhead"`)."""
    if name in ("channels_last", "blocked", "auto"):
        auto = name == "auto"
        net = accelerate(SimpleNamespace(net=copy.deepcopy(net), device=example[0].device), dtype=example[0].dtype,
                         channels_last=None if auto else True, packed=None if auto else name == "blocked").net
        if next(net.parameters()).is_contiguous(memory_format=torch.channels_last):
            example = (example[0].contiguous(memory_format=torch.channels_last),) + example[1:]
    elif name in ("compile", "graph"):
        if example[0].device.type == "cpu":
            torch._inductor.config.freezing = True
        net = torch.compile(net, mode="reduce-overhead" if name == "graph" else None)
    return lambda: net(*example)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[2])
    ap.add_argument("--size", type=int, nargs="+", default=[64], help="latent size (64: 512x512 images)")
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=DTYPES)
    ap.add_argument("--variants", nargs="+", default=["eager"], choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--force", action="store_true", help="run bf16 even where it is emulated")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="set glibc's malloc up as the `diffusekit` command does (both sides gain)")
    a = ap.parse_args()
    if a.keep_freed_memory:
        keep_freed_memory()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: the GPU benchmark did not run")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
          f"{'malloc keeping freed memory, ' if a.keep_freed_memory else ''}"
          f"{torch.backends.cpu.get_cpu_capability() if device.type == 'cpu' else torch.cuda.get_device_name()}")
    print("| dtype | batch | latent | variant | ours | diffusers | ratio (rounds) | GFLOP | ours GFLOP/s | % of matmul "
          "peak | max err vs fp32 |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    ours32, theirs32 = pair(device)
    for dname in a.dtype:
        dtype = DTYPES[dname]
        if dtype != torch.float32 and native_dtype(device) != dtype and not a.force:
            print(f"| {dname} | skipped: {device} has no native {dname} "
                  f"(cpu capability {torch.backends.cpu.get_cpu_capability()}) | | | | | | | | | |")
            continue
        peak = matmul_peak(dtype, device)
        ours, theirs = ours32.to(dtype), theirs32.to(dtype)
        for size in a.size:
            for batch in a.batch:
                g = torch.Generator().manual_seed(batch * 1000 + size)
                x = torch.randn(batch, 4, size, size, generator=g).to(device)
                ctx = torch.randn(batch, 77, 768, generator=g).to(device)
                t = torch.full((batch,), 500.0, device=device)
                with torch.inference_mode():
                    ref = theirs32.to(torch.float32)(x, t, ctx).sample if dtype != torch.float32 else None
                    theirs32.to(dtype)
                    with FlopCounterMode(display=False, custom_mapping=COUNTED_TOO) as counter:
                        ours(x.to(dtype), t, ctx.to(dtype))
                    flops = counter.get_total_flops()
                    xd, cd = x.to(dtype), ctx.to(dtype)
                    base = lambda: theirs(xd, t, cd).sample  # noqa: E731
                    for vname in a.variants:
                        with torch.inference_mode(False):  # weights copied here keep their version counters
                            fn = variant(ours, vname, (xd, t, cd))
                        out = fn().float()
                        err = (out - (ref if ref is not None else base().float())).abs().max().item()
                        rounds, mine, peer = [], [], []
                        for _ in range(a.rounds):
                            mine.append(best_time(fn, device, a.reps))
                            peer.append(best_time(base, device, a.reps))
                            rounds.append(peer[-1] / mine[-1])
                        tm, tp = statistics.median(mine), statistics.median(peer)
                        unit, scale = ("ms", 1e3) if device.type == "cuda" else ("s", 1)
                        print(f"| {dname} | {batch} | {size} | {vname} | {tm * scale:.3g} {unit} | {tp * scale:.3g} "
                              f"{unit} | {statistics.median(rounds):.2f} ({min(rounds):.2f} - {max(rounds):.2f}) | "
                              f"{flops / 1e9:.0f} | {flops / tm / 1e9:.0f} | {100 * flops / tm / peak:.0f}% of "
                              f"{peak / 1e9:.0f} | {err:.1e} |", flush=True)
        ours32, theirs32 = ours.float(), theirs.float()


if __name__ == "__main__":
    sys.exit(main())
