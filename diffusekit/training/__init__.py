"""Training: data, the diffusion trainer, the autoencoder trainer."""
