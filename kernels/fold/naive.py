"""Plain-torch reference of the fold: the definition the Triton kernel is tested against."""

from __future__ import annotations

import torch


def fold_reference(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, scale: float
) -> torch.Tensor:
    """``W + scale · B[:, idx] A[idx, :]`` as a new tensor in weight's dtype (one rounding, from float64).

    weight ``[N, K]``, lora_a ``[R, K]``, lora_b ``[N, R]``, indices ``[r]`` module indices.
    """
    index = indices.long()
    delta = lora_b[:, index].double() @ lora_a[index].double()
    return (weight.double() + scale * delta).to(weight.dtype)
