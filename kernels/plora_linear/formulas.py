"""The fused op's forward and backward formulas, written once over four products.

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
The forward reads x once (``gemm_lowrank`` computes y and t in one pass), the backward reads dy once
(``gemm_lowrank`` again: dx, dt and the partial sums of dB) and x once (dA). A ``Products`` holds the four
products the formulas need (module ``j`` of ``g`` is ``g.select(g_rows_dim, j)``; the formulas pass ``lora_b``
as rows, ``modules_as_rows``, so that every module is read along its contiguous length):

* ``shrink(x [M, L], g, g_rows_dim, active, bucket, scale)``: ``scale · x G_actᵀ``, ``[M, ≥ r]``;
* ``gemm_with_slab(x [M, L], w [N, L], t, g, g_rows_dim, active, slab_scale, bias)``:
  ``x wᵀ + slab_scale · t G_act (+ bias)``, ``[M, N]`` in x's dtype; ``t=None`` skips the slab;
* ``reduce_over_m(x [M, ROWS], t [M, P])``: ``xᵀ t``, ``[ROWS, P]``;
* ``gemm_lowrank(x [M, L], w [N, L], h, h_rows_dim, g, g_rows_dim, active, bucket, u_scale, slab_scale, bias, t)``:
  ``(y, u, partials)`` with ``u = u_scale · x H_actᵀ``, ``y = x wᵀ + slab_scale · u G_act (+ bias)`` and, given
  ``t``, partial sums of ``xᵀ t`` over blocks of rows (``[blocks, L, ≥ r]``; None without ``t``).

``TRITON``'s ``t``, ``u`` and reductions are fp32, padded with zero columns to the rank bucket;
``TORCH``'s are in the inputs' dtype with ``r`` columns (``naive.py``). The plain-torch path of
``plora_linear`` (CPU tensors without the interpreter) is ``plora_linear_reference`` differentiated by
autograd, and is not built from these products.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .._runtime import rank_bucket
from . import _gemm_lowrank, _triton, naive


class Products(NamedTuple):
    """The four products of the formulas (signatures in the module docstring)."""

    shrink: Callable[..., torch.Tensor]
    gemm_with_slab: Callable[..., torch.Tensor]
    reduce_over_m: Callable[..., torch.Tensor]
    gemm_lowrank: Callable[..., tuple]


#: The Triton kernels (``_triton.py``, ``_gemm_lowrank.py``): what the fused ops run.
TRITON = Products(_triton.shrink, _triton.gemm_with_slab, _triton.reduce_over_m, _gemm_lowrank.gemm_lowrank)
#: cuBLAS matmuls, the slab added in place by ``addmm_`` (``naive.py``): the formulas' plain-torch form.
TORCH = Products(
    naive.shrink_reference, naive.gemm_with_slab_reference, naive.reduce_over_m_reference, naive.gemm_lowrank_reference
)


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

    By default one pass over x computes both (``gemm_lowrank``). ``gemm`` (the signature of
    ``products.gemm_with_slab``) instead computes ``x Wᵀ`` plus the slab after a separate shrink for t; the
    NF4 op passes its in-kernel-dequantising GEMM there, with its NF4 weight as ``weight``."""
    products = products or TRITON
    count = active.numel()
    if gemm is None and count:
        y, t, _ = products.gemm_lowrank(
            x, weight, lora_a, 0, modules_as_rows(lora_b), 0, active, rank_bucket(count), 1.0, scale, bias
        )
        return y, t
    t = lora_input(x, lora_a, active, products)
    gemm = gemm or products.gemm_with_slab
    return gemm(x, weight, t if count else None, modules_as_rows(lora_b), 0, active, scale, bias), t


def backward(
    dy, x, t, weight_t: Callable[[], torch.Tensor], lora_a, lora_b, active, scale: float, needs, trainable=None,
    products: Products | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Those of ``(dx, dA, dB)`` that ``needs`` (three bools) asks for, in that order.

    ``dy [M, N]``; ``x`` and ``t`` as ``forward`` saved them; ``weight_t()`` gives ``W0ᵀ [K, N]`` (called
    only for ``dx``). ``dA [R, K]`` and ``dB [N, R]`` are zero outside the first ``trainable`` modules of
    ``active`` (default: all of them). With dx asked for, one pass over dy gives dx, dt and dB's partial
    sums (``gemm_lowrank``); dA is one pass over x."""
    products = products or TRITON
    need_x, need_a, need_b = needs
    count = active.numel()
    trainable = count if trainable is None else trainable
    grads, dt, db_act = [], None, None
    if need_x and count:
        with_db = t if need_b and trainable else None
        dx, dt, partials = products.gemm_lowrank(
            dy, weight_t(), modules_as_rows(lora_b), 0, lora_a, 0, active, t.shape[1], scale, 1.0, None, with_db
        )
        db_act = None if partials is None else partials.sum(0)  # already scaled by s
        grads.append(dx)
    elif need_x:
        grads.append(products.gemm_with_slab(dy, weight_t(), None, lora_a, 0, active, 1.0, None))
    elif need_a and count:
        dt = products.shrink(dy, modules_as_rows(lora_b), 0, active, t.shape[1], scale)
    if need_a:
        da = torch.zeros_like(lora_a)
        if trainable:
            da.index_copy_(0, active[:trainable].long(), products.reduce_over_m(x, dt)[:, :trainable].T.to(da.dtype))
        grads.append(da)
    if need_b:
        db = torch.zeros_like(lora_b)
        if trainable:
            db_act = products.reduce_over_m(dy, t) * scale if db_act is None else db_act
            db.index_copy_(1, active[:trainable].long(), db_act[:, :trainable].to(db.dtype))
        grads.append(db)
    return grads
