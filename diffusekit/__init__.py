"""diffusekit: diffusion image generation in compact PyTorch."""

__version__ = "0.1.0"
