"""The fused op's forward and backward formulas (DESIGN.md §3), written once over three products.

With ``s`` the scale, ``A_act`` the active rows of ``lora_a`` and ``B_act`` the active columns of ``lora_b``::

    forward    t      = x A_actᵀ                  [M, r]   (saved for backward, with x)
               y      = x W0ᵀ + s · t B_actᵀ (+ bias)  [M, N]
    backward   dt     = s · dy B_act              [M, r]
               dB_act = s · dyᵀ t                 [N, r]
               dA_act = dtᵀ x                     [r, K]
               dx     = dy W0 + dt A_act          [M, K]   (one GEMM: dt A_act is an extra K-slab)

``forward`` and ``backward`` below are these formulas; everything that computes the op calls them: the
fused op (``op.py``) and the NF4 op (``plora_linear_nf4``) with the Triton kernels (``TRITON``), the
benchmarks' Unsloth-style path and the tests' float64 check of the formulas with cuBLAS (``TORCH``).
A ``Products`` holds the three products the formulas need (module ``j`` of ``g`` is
``g.select(g_rows_dim, j)``: a row of ``lora_a`` for ``g_rows_dim = 0``, a column of ``lora_b`` for 1):

* ``shrink(x [M, L], g, g_rows_dim, active, bucket, scale)``: ``scale · x G_actᵀ``, ``[M, ≥ r]``;
* ``gemm_with_slab(x [M, L], w [N, L], t, g, g_rows_dim, active, slab_scale, bias)``:
  ``x wᵀ + slab_scale · t G_act (+ bias)``, ``[M, N]`` in x's dtype; ``t=None`` skips the slab;
* ``reduce_over_m(x [M, ROWS], t [M, P])``: ``xᵀ t``, ``[ROWS, P]``.

``TRITON``'s ``t`` and reductions are fp32, ``t`` padded with zero columns to the rank bucket;
``TORCH``'s are in the inputs' dtype with ``r`` columns (``naive.py``). The plain-torch path of
``plora_linear`` (CPU tensors without the interpreter) is ``plora_linear_reference`` differentiated by
autograd, and is not built from these products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._runtime import rank_bucket
from . import _triton, naive


class Products(NamedTuple):
    """The three products of the formulas (signatures in the module docstring)."""

    shrink: Callable[..., torch.Tensor]
    gemm_with_slab: Callable[..., torch.Tensor]
    reduce_over_m: Callable[..., torch.Tensor]


#: The Triton kernels (``_triton.py``): what the fused ops run.
TRITON = Products(_triton.shrink, _triton.gemm_with_slab, _triton.reduce_over_m)
#: cuBLAS matmuls, the slab added in place by ``addmm_`` (``naive.py``): the formulas' plain-torch form.
TORCH = Products(naive.shrink_reference, naive.gemm_with_slab_reference, naive.reduce_over_m_reference)


def modules_as_rows(lora_b: torch.Tensor) -> torch.Tensor:
    """``lora_b [N, R]`` as ``[R, N]`` with every module ``b_j`` a contiguous row, so kernels read a tile of
    active modules with vector loads along N (a copy unless ``lora_b`` is already stored that way)."""
    rows = lora_b.T
    return rows if rows.stride(1) == 1 else rows.contiguous()


def lora_input(x: torch.Tensor, lora_a: torch.Tensor, active: torch.Tensor, products: Products | None = None):
    """``t = x A_actᵀ`` (``[M, ≥ r]``, see ``Products``), or fp32 ``[M, 0]`` when no module is active."""
    products = products or TRITON
    count = active.numel()
    if not count:
        return x.new_empty((x.shape[0], 0), dtype=torch.float32)
    return products.shrink(x, lora_a, 0, active, rank_bucket(count), 1.0)


def forward(x, weight, lora_a, lora_b, active, scale: float, bias, products: Products | None = None, gemm=None):
    """``(y, t)`` on 2-D ``x [M, K]``: ``t = x A_actᵀ``, ``y = x Wᵀ + s · t B_actᵀ (+ bias)``.

    ``gemm`` (default ``products.gemm_with_slab``) computes ``x Wᵀ`` plus the slab; the NF4 op passes its
    in-kernel-dequantising GEMM there, with its NF4 weight as ``weight``."""
    products = products or TRITON
    t = lora_input(x, lora_a, active, products)
    gemm = gemm or products.gemm_with_slab
    return gemm(x, weight, t if t.shape[1] else None, modules_as_rows(lora_b), 0, active, scale, bias), t


def backward(
    dy, x, t, weight_t: Callable[[], torch.Tensor], lora_a, lora_b, active, scale: float, needs, trainable=None,
    products: Products | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Those of ``(dx, dA, dB)`` that ``needs`` (three bools) asks for, in that order.

    ``dy [M, N]``; ``x`` and ``t`` as ``forward`` saved them; ``weight_t()`` gives ``W0ᵀ [K, N]`` (called
    only for ``dx``). ``dA [R, K]`` and ``dB [N, R]`` are zero outside the first ``trainable`` modules of
    ``active`` (default: all of them)."""
    products = products or TRITON
    need_x, need_a, need_b = needs
    trainable = active.numel() if trainable is None else trainable
    dt = None
    if active.numel() and (need_x or need_a):
        dt = products.shrink(dy, modules_as_rows(lora_b), 0, active, t.shape[1], scale)
    grads = []
    if need_x:
        grads.append(products.gemm_with_slab(dy, weight_t(), dt, lora_a, 0, active, 1.0, None))
    if need_a:
        da = torch.zeros_like(lora_a)
        if trainable:
            da.index_copy_(0, active[:trainable].long(), products.reduce_over_m(x, dt)[:, :trainable].T.to(da.dtype))
        grads.append(da)
    if need_b:
        db = torch.zeros_like(lora_b)
        if trainable:
            db.index_copy_(1, active[:trainable].long(), (products.reduce_over_m(dy, t)[:, :trainable] * scale).to(db.dtype))
        grads.append(db)
    return grads
