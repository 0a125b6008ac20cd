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


# ------------------------------------------------------------------ the kernels' products in plain torch
# What ``formulas.TORCH`` computes with: each is the reference of the Triton launcher of the same name
# (``_triton.py``), in the inputs' dtype through cuBLAS, without padding ``t`` to a rank bucket.


def _modules(g: torch.Tensor, g_rows_dim: int, active: torch.Tensor) -> torch.Tensor:
    """``G_act [r, L]``: module ``active[p]`` of ``g`` (``g.select(g_rows_dim, j)``) as row ``p``."""
    rows = g.index_select(g_rows_dim, active.long())
    return rows if g_rows_dim == 0 else rows.T


def shrink_reference(x, g, g_rows_dim: int, active, bucket: int, scale: float) -> torch.Tensor:
    """``scale · x[M, L] G_actᵀ``, ``[M, r]`` in x's dtype (``bucket`` unused: no padding)."""
    g_act = _modules(g, g_rows_dim, active)
    return torch.addmm(x.new_empty(()), x, g_act.T, beta=0, alpha=scale)


def gemm_with_slab_reference(x, w, t, g, g_rows_dim: int, active, slab_scale: float, bias) -> torch.Tensor:
    """``x[M, L] w[N, L]ᵀ (+ bias) + slab_scale · t[:, :r] G_act``, ``[M, N]`` in x's dtype; the slab is
    added in place (``addmm_``); ``t=None`` skips it."""
    y = x @ w.T if bias is None else torch.addmm(bias, x, w.T)
    if t is not None:
        y.addmm_(t[:, : active.numel()].to(y.dtype), _modules(g, g_rows_dim, active), alpha=slab_scale)
    return y


def reduce_over_m_reference(x, t) -> torch.Tensor:
    """``x[M, ROWS]ᵀ t[M, P]``, ``[ROWS, P]`` in x's dtype."""
    return x.T @ t.to(x.dtype)


def gemm_lowrank_reference(x, w, h, h_rows_dim: int, g, g_rows_dim: int, active, bucket: int, u_scale, slab_scale, bias, t=None):
    """``(y, u, partials)``: ``u = u_scale · x H_actᵀ`` (``[M, r]``), ``y = x wᵀ + slab_scale · u G_act (+ bias)`` and,
    given ``t``, ``u_scale · xᵀ t`` as one block ``[1, L, r]``; in x's dtype (``bucket`` unused)."""
    u = shrink_reference(x, h, h_rows_dim, active, bucket, u_scale)
    y = gemm_with_slab_reference(x, w, u, g, g_rows_dim, active, slab_scale, bias)
    return y, u, None if t is None else (reduce_over_m_reference(x, t) * u_scale)[None]
