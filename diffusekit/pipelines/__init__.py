"""Pipelines: a network with its conditioning and autoencoder (`Pipeline`), its model folders (`load_pipeline`,
`save_pipeline`), and `generate`."""

from .generate import generate
from .loading import load_classifier, load_pipeline, save_pipeline
from .pipeline import Pipeline

__all__ = ["Pipeline", "generate", "load_classifier", "load_pipeline", "save_pipeline"]
