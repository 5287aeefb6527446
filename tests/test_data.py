import json
import warnings

import pytest
import torch
from PIL import Image

from diffusekit.data import MNIST, ImageFolder, Shapes


def test_mnist_bundled_resized_and_padded():
    m = MNIST()
    assert len(m) == 10_000 and m.images.shape == (10_000, 1, 28, 28) and m.num_classes == 10
    assert m.images.min() == -1 and m.images.max() == 1 and set(m.labels.tolist()) == set(range(10))
    padded = MNIST(32, pad=2)
    assert padded.images.shape[-1] == 32 and torch.equal(padded.images[:, :, 2:30, 2:30], m.images)
    assert (padded.images[:, :, :2] == -1).all()
    assert MNIST(14).images.shape[-1] == 14
    batch = m.get_batch([3, 5])
    assert torch.equal(batch["image"], m.images[[3, 5]]) and batch["label"].tolist() == m.labels[[3, 5]].tolist()


def _folder(tmp_path, n=4, size=(40, 30)):
    for i in range(n):
        Image.new("RGB", size, (60 * i, 10, 200)).save(tmp_path / f"img{i}.png")
    return tmp_path


def test_folder_with_metadata_jsonl(tmp_path):
    root = _folder(tmp_path)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"img{i}.png", "text": f"picture {i}",
                                                               "label": i % 2}) for i in range(4)))
    ds = ImageFolder(root, resolution=16)
    s = ds[1]
    assert s["image"].shape == (3, 16, 16) and s["caption"] == "picture 1" and s["label"] == 1
    assert s["original_size"] == (30, 40) and s["crop_top_left"] == (0, (21 - 16) // 2)  # 40x30 -> 21x16, centre crop
    assert ds.num_classes == 2


def test_folder_with_txt_captions_random_crop_flip_is_deterministic(tmp_path):
    root = _folder(tmp_path)
    (root / "img2.txt").write_text("a caption beside the image\n")
    ds = ImageFolder(root, resolution=16, random_crop=True, random_flip=True, seed=3)
    assert ds[2]["caption"] == "a caption beside the image" and "caption" not in ds[0]
    assert torch.equal(ds[1]["image"], ds[1]["image"])  # a pure function of (seed, epoch, index)


def test_unreadable_images_are_reported_and_skipped(tmp_path):
    root = _folder(tmp_path)
    (root / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    ds = ImageFolder(root, resolution=8)
    with pytest.warns(UserWarning, match="img1.png"):
        s = ds[1]
    assert s["image"].shape == (3, 8, 8)  # the next readable image instead
    assert "img1.png" in next(iter(ds.bad))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[1]  # reported once


def test_empty_or_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        ImageFolder(tmp_path, resolution=8)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder(tmp_path / "nope", resolution=8)
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text("{not json}\n")
    with pytest.raises(ValueError, match="metadata.jsonl:1"):
        ImageFolder(tmp_path, resolution=8)


def test_shapes_captions_describe_the_picture():
    ds = Shapes(resolution=32, size=50, seed=1)
    s = ds[7]
    assert s["image"].shape == (3, 32, 32) and torch.equal(s["image"], ds[7]["image"]) and s["caption"] == ds[7]["caption"]
    colours = {"red": 0, "green": 1, "blue": 2}
    for i in range(50):
        s = ds[i]
        words = s["caption"].split()
        assert words[0] == "a" and words[1] in ("small", "large")
        if len(words) == 4 and words[2] in colours:
            # a single shape: its colour channel dominates the centre pixel
            centre = s["image"][:, 16, 16]
            assert centre.argmax().item() == colours[words[2]], s["caption"]
