"""Argument checks shared by the dense and the 4-bit fold (the weight may be packed, so its shape,
dtype and device are passed in rather than read from a float tensor). Nothing is written before they pass."""

from __future__ import annotations

import torch

from .._checks import check_float_dtype, check_indices, check_scale, check_tensor


def check_fold_args(
    weight_name: str,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    lora_a,
    lora_b,
    indices,
    scale,
) -> float:
    """``lora_a [R, K]``, ``lora_b [N, R]`` of ``dtype`` on ``device`` for a weight of ``shape = (N, K)``;
    ``indices`` distinct module indices in ``[0, R)`` on ``device``; returns ``scale`` as a float."""
    n, k = shape
    check_tensor("lora_a", lora_a, ndim=2)
    check_tensor("lora_b", lora_b, ndim=2)
    r = lora_a.shape[0]
    if lora_a.shape[1] != k:
        raise ValueError(f"lora_a must have shape [R, K] = [R, {k}] (K from {weight_name} [N, K]), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (n, r):
        raise ValueError(
            f"lora_b must have shape [N, R] = [{n}, {r}] (N from {weight_name}, R from lora_a), got {tuple(lora_b.shape)}"
        )
    if r == 0:
        raise ValueError("lora_a must hold at least one module (R >= 1), got R = 0")
    for name, tensor in (("lora_a", lora_a), ("lora_b", lora_b)):
        check_float_dtype(name, tensor)
        if tensor.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} (the dtype of {weight_name}), got {tensor.dtype}")
        if tensor.device != device:
            raise ValueError(f"{name} must be on {device} (the device of {weight_name}), got {tensor.device}")
    check_tensor("indices", indices, ndim=1)
    if indices.device != device:
        raise ValueError(f"indices must be on {device} (the device of {weight_name}), got {indices.device}")
    check_indices("indices", indices, r, device)
    return check_scale("scale", scale)
