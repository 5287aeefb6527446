"""Loading other people's checkpoints: diffusers folders and original Stable Diffusion single files."""
