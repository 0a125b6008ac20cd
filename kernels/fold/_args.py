"""Argument checks shared by the dense and the 4-bit fold (the weight may be packed, so its shape,
dtype and device are passed in rather than read from a float tensor). Nothing is written before they pass."""

from __future__ import annotations

import torch

from .._checks import check_adapters, check_indices, check_scale


def check_fold_args(
    weight_name: str,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    lora_a,
    lora_b,
    indices,
    scale,
) -> tuple[float, torch.Tensor]:
    """``lora_a [R, K]``, ``lora_b [N, R]`` of ``dtype`` on ``device`` for a weight of ``shape = (N, K)``;
    ``indices`` distinct module indices in ``[0, R)`` on ``device``, any strides. Returns ``scale`` as a
    float and the index tensor to compute with (``check_indices``: contiguous)."""
    r = check_adapters(lora_a, lora_b, shape, weight_name, dtype, device, weight_name)
    indices = check_indices("indices", indices, r, device, weight_name)
    return check_scale("scale", scale), indices
