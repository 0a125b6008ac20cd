"""``fold_`` / ``unfold_``: add (subtract) PLoRA modules into a dense base weight, in place."""

from __future__ import annotations

import torch

from .._checks import check_float_dtype, check_tensor, check_writable_once
from .._runtime import INTERPRET, rank_bucket
from ._args import check_fold_args
from ._triton import fold_launch
from .naive import fold_reference


def fold_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, scale: float) -> torch.Tensor:
    """``W += scale · B[:, idx] A[idx, :]`` in place; returns ``weight``.

    Args:
        weight: ``[N, K]`` fp32, fp16 or bf16 (any strides); modified in place.
        lora_a: ``[R, K]`` module down-projections (rows), weight's dtype and device.
        lora_b: ``[N, R]`` module up-projections (columns), weight's dtype and device.
        indices: ``[r]`` integer tensor of distinct module indices in ``[0, R)`` on weight's device, any
            strides (may be empty: nothing happens), validated as ``plora_linear``'s ``active``. Changing
            it never recompiles the kernel.
        scale: the module scale ``s``.

    Every element is computed as ``round(w + s · Σ_j b_nj a_jk)`` with fp32 accumulation and a single
    rounding to weight's dtype, tile by tile, with no ``[N, K]`` temporary. CUDA tensors (and CPU
    tensors under ``TRITON_INTERPRET=1``) run the Triton kernel; other CPU tensors take the plain-torch
    reference. Autograd sees the in-place change (weight's version counter is bumped).
    """
    return _fold(weight, lora_a, lora_b, indices, scale, 1.0)


def unfold_(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, scale: float
) -> torch.Tensor:
    """``W -= scale · B[:, idx] A[idx, :]`` in place (the inverse of ``fold_`` up to rounding); returns ``weight``."""
    return _fold(weight, lora_a, lora_b, indices, scale, -1.0)


def _fold(weight, lora_a, lora_b, indices, scale, sign: float) -> torch.Tensor:
    check_tensor("weight", weight, ndim=2)
    check_float_dtype("weight", weight)
    check_writable_once("weight", weight)
    scale, indices = check_fold_args("weight", tuple(weight.shape), weight.dtype, weight.device, lora_a, lora_b, indices, scale)
    scale *= sign
    if indices.numel() == 0 or weight.numel() == 0:
        return weight
    with torch.no_grad():
        if weight.is_cuda or INTERPRET:
            fold_launch(weight, lora_a, lora_b, indices, rank_bucket(indices.numel()), scale)
            torch.autograd.graph.increment_version(weight)
        else:
            weight.copy_(fold_reference(weight, lora_a, lora_b, indices, scale))
    return weight
