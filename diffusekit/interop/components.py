"""The parts of a diffusers pipeline folder and how each is read: its scheduler config as our DiffusionSettings,
and the converter of each model class (`diffusekit.pipelines.foreign` assembles them into a Pipeline)."""

from __future__ import annotations

from typing import Any, Mapping

from ..checkpoints import CheckpointError
from ..denoisers import DiffusionSettings
from ..schedules import STEP_SPACINGS
from .common import check_options
from .diffusers_transformers import DIT, MMDIT
from .diffusers_unet import UNET
from .diffusers_vae import KL, VQ

DENOISERS = {name: spec for spec in (UNET, DIT, MMDIT) for name in spec.class_names}
AUTOENCODERS = {name: spec for spec in (KL, VQ) for name in spec.class_names}
CLASS_CONDITIONAL = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")  # num_classes is read from these
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VP_SCHEDULERS = {  # diffusers schedulers over a beta table -> their default timestep_spacing
    **dict.fromkeys(["DDPMScheduler", "DDIMScheduler", "PNDMScheduler"], "leading"),
    **dict.fromkeys(["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler",
                     "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler",
                     "LMSDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
                     "UniPCMultistepScheduler", "DEISMultistepScheduler", "SASolverScheduler"], "linspace"),
}
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
MATH_OPTIONS = {  # scheduler options that change what the network's times and outputs mean: their neutral values
    "trained_betas": (None,), "timestep_type": ("discrete",), "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,), "invert_sigmas": (False,), "shift_terminal": (None,),
}
SD1_SETTINGS = dict(schedule="scaled_linear", beta_range=(0.00085, 0.012), prediction="eps", spacing="leading",
                    steps_offset=1)


def settings_from_scheduler(cfg: Mapping[str, Any]) -> DiffusionSettings:
    """DiffusionSettings from a diffusers scheduler_config.json: noise schedule, prediction type, default spacing.

    Options that change the math without a counterpart here (custom trained_betas, another beta_schedule,
    continuous timesteps, dynamic shifting, ...) raise CheckpointError; sampler choices (clip_sample,
    thresholding, Karras sigmas, solver order, ...) are not read: pick the sampler in `generate`."""
    name = cfg.get("_class_name")
    if name not in VP_SCHEDULERS and name not in FLOW_SCHEDULERS:
        raise CheckpointError(f"scheduler {name} is not supported (supported: {[*VP_SCHEDULERS, *FLOW_SCHEDULERS]})")
    check_options(cfg, MATH_OPTIONS, name)
    T = cfg.get("num_train_timesteps", 1000)
    if name in FLOW_SCHEDULERS:
        return DiffusionSettings(schedule="flow", timesteps=T, shift=cfg.get("shift", 1.0), prediction="flow",
                                 timestep_scale=T)
    check_options(cfg, {"beta_schedule": tuple(BETA_SCHEDULES), "prediction_type": tuple(PREDICTIONS),
                        "timestep_spacing": tuple(STEP_SPACINGS)}, name)
    schedule = BETA_SCHEDULES[cfg.get("beta_schedule", "linear")]
    beta_range = None if schedule == "cosine" else (cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02))
    return DiffusionSettings(schedule=schedule, timesteps=T, zero_terminal_snr=cfg.get("rescale_betas_zero_snr", False),
                             prediction=PREDICTIONS[cfg.get("prediction_type", "epsilon")], beta_range=beta_range,
                             spacing=cfg.get("timestep_spacing") or VP_SCHEDULERS[name],
                             steps_offset=cfg.get("steps_offset", 0))
