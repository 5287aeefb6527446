"""What ships inside the package: the assets folder, the bundled models by name, the MNIST digits and the
MNIST feature classifier. Every other module finds them here."""

from __future__ import annotations

from pathlib import Path

from .validation import did_you_mean

ASSETS = Path(__file__).resolve().parent / "assets"
MODELS = {  # bundled name -> model folder
    "mnist": ASSETS / "mnist_unet",  # class-conditional 28x28 UNet
    "mnist14": ASSETS / "mnist_unet_14",  # the same at 14x14
    "mnist_sr": ASSETS / "mnist_sr",  # super-resolution 14x14 -> 28x28
    "shape_maps": ASSETS / "shape_maps",  # shape scenes from semantic maps, 32x32 (convolutional beyond)
    "shape_layouts": ASSETS / "shape_layouts",  # shape scenes from layouts of boxes, 32x32
    "shape_captions": ASSETS / "shape_captions",  # the same scenes from captions (the layouts' text baseline)
}
MNIST_DIGITS = ASSETS / "mnist10k.npz"  # 10,000 MNIST digits (MIT): images uint8 [N, 28, 28], labels
MNIST_CLASSIFIER = ASSETS / "mnist_classifier"  # the feature classifier of `diffusekit eval`
CLASSIFIERS = {"mnist_noisy": ASSETS / "mnist_noisy_classifier"}  # noise-aware classifiers (classifier guidance)
MODEL_FILES = (".safetensors", ".ckpt")  # single-file Stable Diffusion checkpoints


def classifier_folder(name: str | Path) -> Path:
    """The folder of a bundled noise-aware classifier's name, or `name` itself if it is a folder."""
    if str(name) in CLASSIFIERS:
        return CLASSIFIERS[str(name)]
    if Path(name).is_dir():
        return Path(name)
    raise ValueError(f"classifier {str(name)!r} is neither a folder nor a bundled classifier ({', '.join(CLASSIFIERS)})"
                     f"{did_you_mean(str(name), CLASSIFIERS)}")


def model_folder(name: str | Path) -> Path:
    """The folder of a bundled model's name, or `name` itself if it is a folder (ours or a diffusers pipeline's)
    or a Stable Diffusion single file (.safetensors / .ckpt)."""
    if str(name) in MODELS:
        return MODELS[str(name)]
    path = Path(name)
    if path.is_dir() or (path.is_file() and path.suffix in MODEL_FILES):
        return path
    raise ValueError(f"model {str(name)!r} is neither a model folder, a Stable Diffusion .safetensors / .ckpt file "
                     f"nor a bundled model ({', '.join(MODELS)}){did_you_mean(str(name), MODELS)}")
