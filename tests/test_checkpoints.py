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
