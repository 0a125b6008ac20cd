"""Plain-torch reference of the fused PLoRA linear op: the definition the Triton kernels are tested against."""

from __future__ import annotations

import torch


def plora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + scale · Σ_{j ∈ active} (x · a_j) b_jᵀ + bias`` computed in the inputs' dtype.

    x ``[..., K]``, weight ``[N, K]``, lora_a ``[R, K]``, lora_b ``[N, R]``, active ``[r]`` module
    indices, bias ``[N]``; returns ``[..., N]``. Differentiable by autograd in every tensor argument.
    """
    index = active.long()
    y = x @ weight.T + scale * ((x @ lora_a[index].T) @ lora_b[:, index].T)
    if bias is not None:
        y = y + bias
    return y
