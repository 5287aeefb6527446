"""Pipelines: a trained model folder -> images (text / class to image, and the tasks built on it)."""
