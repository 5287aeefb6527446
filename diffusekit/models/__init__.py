"""Networks: UNet, DiT, MM-DiT, autoencoders (imported here so that they register for loading)."""

from . import autoencoder, dit, mmdit, unet  # noqa: F401
