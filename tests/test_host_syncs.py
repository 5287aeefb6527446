"""No sampling step waits on the device (issue 11): the state, the network and the conditions live on
the meta device, which stands in for an accelerator -- any host read of a device tensor (item, bool,
tolist, nonzero, a copy to the CPU) is counted here and would raise on meta anyway. Times and schedule
math stay on the host."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusekit.models import build
from diffusekit.models.unet import DeepCache
from diffusekit.denoisers import NetworkDenoiser
from diffusekit.guidance import CFG, UpsampleGuidance
from diffusekit.samplers import SAMPLERS
from diffusekit.schedules import make_schedule

HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "item", "_to_copy", "copy_"}


class DeviceReads(TorchDispatchMode):
    """Counts ops that bring a device tensor's values to the host."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        on_device = [a for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"]
        to_host = name in ("_to_copy", "copy_") and on_device and (
            kwargs.get("device") == torch.device("cpu") or (name == "copy_" and args[0].device.type == "cpu"))
        if on_device and (name in HOST_READS - {"_to_copy", "copy_"} or to_host):
            self.reads.append(name)
        return func(*args, **kwargs)


NETS = {
    "unet": dict(in_channels=1, out_channels=1, channels=8, channel_mult=(1, 2), num_res_blocks=1, norm_groups=4,
                 attention_levels=(1,), num_heads=2, context_dim=None, num_classes=10, null_class=True),
    "dit": dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
                learned_sigma=False),
}


@pytest.mark.parametrize("schedule_name", ["scaled_linear", "flow"])
@pytest.mark.parametrize("net_type", list(NETS))
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_no_host_sync_in_a_sampling_step(name, net_type, schedule_name):
    if schedule_name == "flow" and name == "ddpm":
        pytest.skip("DDPM is a VP sampler")
    schedule = make_schedule(schedule_name)
    net = build(net_type, NETS[net_type], device="meta").eval()
    labels = torch.tensor([1, 2], device="meta")
    den = CFG(NetworkDenoiser(net, schedule, "v" if schedule_name != "flow" else "flow"), 3.0,
              {"class_labels": torch.full((2,), 10, device="meta")})
    den = UpsampleGuidance(den, schedule, 2, 0.5, eta=0.6)  # the eta switch-off is decided on the host
    counter, steps = DeviceReads(), []
    x = torch.randn(2, 1, 16, 16, device="meta")
    with torch.no_grad(), counter:
        y = SAMPLERS[name](den, x, schedule.timesteps(4), schedule, {"class_labels": labels},
                           generator=torch.Generator().manual_seed(0), callback=lambda *a: steps.append(1))
    assert y.device.type == "meta" and len(steps) == 4
    assert counter.reads == []


def test_the_counter_sees_a_host_read():
    """Negative control: the check above would catch an .item() or a copy to the CPU."""
    counter = DeviceReads()
    x = torch.ones(3, device="meta")
    for read in (lambda: x.sum().item(), lambda: x.cpu(), lambda: bool(x[0])):
        with counter, pytest.raises((RuntimeError, NotImplementedError)):  # meta has no values to read
            read()
    assert counter.reads == ["_local_scalar_dense", "_to_copy", "_local_scalar_dense"]


@pytest.mark.parametrize("name", ["dpmpp_2m", "heun", "dpmpp_sde"])
def test_no_host_sync_with_fewer_evaluations(name):
    """CFG-until's choice and DeepCache's reuse are decided on the host (times, call counts)."""
    schedule = make_schedule("scaled_linear")
    net = DeepCache(build("unet", NETS["unet"], device="meta").eval(), 2)
    den = CFG(NetworkDenoiser(net, schedule, "v"), 3.0, {"class_labels": torch.full((2,), 10, device="meta")},
              t_stop=schedule.timesteps(4)[2].item())
    counter = DeviceReads()
    with torch.no_grad(), counter:
        y = SAMPLERS[name](den, torch.randn(2, 1, 16, 16, device="meta"), schedule.timesteps(4), schedule,
                           {"class_labels": torch.tensor([1, 2], device="meta")}, generator=torch.Generator())
    assert y.device.type == "meta" and sum(net.calls.values()) >= 4 and len(net.calls) == 2  # batches 4 and 2
    assert counter.reads == []
