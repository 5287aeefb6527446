"""The weights' finiteness check that every checkpoint load and save runs."""

import torch

from diffusekit.tensorfiles import first_non_finite


def test_first_non_finite_names_the_tensor():
    """NaN, inf or -inf anywhere in a floating tensor of any precision is found and named; large finite values,
    integer and empty tensors pass."""
    big = torch.full((4,), 3e38)  # finite, its sum would overflow float32
    ok = {"ids": torch.arange(3), "big": big, "half": torch.full((8,), 6e4, dtype=torch.float16), "none": torch.ones(0)}
    assert first_non_finite(ok) is None
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.zeros(5, dtype=torch.bfloat16)
        w[3] = bad
        assert first_non_finite({**ok, "w": w, "after": torch.ones(2)}) == "w"
    assert first_non_finite({"pos": torch.tensor([float("inf")]), "neg": torch.tensor([-float("inf")])}) == "pos"


def test_read_state_dict_casts_piece_by_piece(tmp_path, monkeypatch):
    """A cast read maps the file in pieces (here 1 KB, so most tensors get a piece of their own) and returns
    every tensor, floating ones cast exactly as .to(dtype) would, integer ones as stored."""
    from safetensors.torch import save_file

    from diffusekit import tensorfiles
    from diffusekit.checkpoints import read_state_dict

    g = torch.Generator().manual_seed(0)
    state = {f"w{i}": torch.randn(7 * i + 1, 9, generator=g) for i in range(12)}
    state.update(ids=torch.arange(5), half=torch.randn(300, dtype=torch.float16, generator=g))
    save_file(state, tmp_path / "m.safetensors")
    monkeypatch.setattr(tensorfiles, "PIECE_BYTES", 1024)
    for dtype in (None, torch.bfloat16):
        read = read_state_dict(tmp_path / "m.safetensors", dtype=dtype)
        assert read.keys() == state.keys()
        for k, v in state.items():
            expected = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            assert read[k].dtype == expected.dtype and torch.equal(read[k], expected), k
