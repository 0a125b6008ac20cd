"""Triton kernels of the fused PLoRA linear op and their launchers.

Three of the four products that ``formulas.py`` writes the forward and the backward with (which product
computes which term is stated there, once; the fourth, ``gemm_lowrank``, has a module of its own):

* ``shrink``: ``t = scale · X G_actᵀ``, a thin ``[M, P]`` product whose rows of ``G`` are gathered
  through the active-index tensor (the NF4 op's forward, and dt when x needs no gradient);
* ``gemm_with_slab``: ``Y = X Wᵀ + slab_scale · T G_act (+ bias)``, a GEMM whose accumulator is seeded by
  the low-rank slab (with no module active, the plain GEMM);
* ``reduce_over_m``: partial sums over row splits of ``Xᵀ T`` (dA, and dB when x needs no gradient).

Each has a plain-torch reference of the same signature in ``naive.py``.

The active set enters only as a device tensor of int64 indices plus its length ``r`` (never specialised,
never read on the host); shapes are padded to the rank bucket ``P`` (a constexpr power of two >= 16),
so changing the active set within a bucket never recompiles. Every kernel autotunes on ``M_BUCKET``
(``token_bucket(M)``, a power of two), never on the token count itself, and on its strides (``_runtime.autotune``),
so a new batch length reuses its bucket's tuned config and a transposed operand is tuned for itself. Matrices are
addressed through strides, so transposed or otherwise non-contiguous operands need no copy.

Each launcher records the FLOPs and minimal HBM bytes of its launch (``_cost.record``) beside the launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cost import record
from .._runtime import (
    ACTIVE_SET_ARGS,
    INTERPRET,
    TOKEN_ARGS,
    autotune,
    device_guard,
    multiprocessors,
    token_bucket,
    upcast_in_kernel,
)
from .._tl import add_low_rank_slab, grouped_tile, load_modules, load_tile, store_output_tile


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands use exact fp32 products (torch's default for fp32 matmul), never tf32.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------------
# shrink: t[M, P] = scale * X[M, K] @ G[idx, :]ᵀ  (padded columns p >= r are written as zeros)
# --------------------------------------------------------------------------------------------------


@autotune(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bk, w, s in [(64, 128, 4, 3), (128, 64, 4, 3), (32, 256, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3)]
    ],
    triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}),
    key=["M_BUCKET", "K", "P"],
)
@triton.jit(do_not_specialize=ACTIVE_SET_ARGS + TOKEN_ARGS)
def _shrink_kernel(
    x_ptr, g_ptr, idx_ptr, t_ptr,
    M, K, r, R, scale, M_BUCKET,
    stride_xm, stride_xk, stride_g_idx, stride_g_k, stride_tm,
    P: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, P)
    rows, active = load_modules(idx_ptr, r, R, P)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k, UPCAST)
        g = load_tile(g_ptr, offs_k, rows, stride_g_k, stride_g_idx, mask_k, active, UPCAST)
        acc = tl.dot(x, g, acc, input_precision=DOT_PRECISION)
    tl.store(t_ptr + offs_m[:, None] * stride_tm + offs_p[None, :], acc * scale, mask=mask_m[:, None])


def shrink(x: torch.Tensor, g: torch.Tensor, g_rows_dim: int, active: torch.Tensor, bucket: int, scale: float):
    """``scale · x[M, K] @ G_actᵀ`` as fp32 ``[M, bucket]``; module ``j`` of ``g`` is ``g.select(g_rows_dim, j)``."""
    m, k = x.shape
    t = torch.empty((m, bucket), device=x.device, dtype=torch.float32)
    stride_g_idx, stride_g_k = g.stride(g_rows_dim), g.stride(1 - g_rows_dim)
    e = x.element_size()
    record("shrink", 2 * m * k * bucket, (m * k + active.numel() * k) * e + m * bucket * 4)
    with device_guard(x):
        _shrink_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            x, g, active, t,
            m, k, active.numel(), g.shape[g_rows_dim], scale, token_bucket(m),
            x.stride(0), x.stride(1), stride_g_idx, stride_g_k, t.stride(0),
            P=bucket, UPCAST=upcast_in_kernel(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        )  # fmt: skip
    return t


# --------------------------------------------------------------------------------------------------
# gemm_with_slab: Y[M, N] = X[M, K] @ W[N, K]ᵀ + slab_scale * T[M, P] @ G[idx, N-range]ᵀ (+ bias)
# --------------------------------------------------------------------------------------------------


@autotune(
    [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in [
            (128, 256, 64, 8, 3),
            (128, 128, 64, 8, 4),
            (128, 64, 64, 4, 4),
            (64, 64, 64, 4, 4),
        ]
    ],
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}),
    key=["M_BUCKET", "N", "K", "P", "HAS_SLAB", "HAS_BIAS"],
)
@triton.jit(do_not_specialize=ACTIVE_SET_ARGS + TOKEN_ARGS)
def _gemm_with_slab_kernel(
    x_ptr, w_ptr, t_ptr, g_ptr, idx_ptr, bias_ptr, y_ptr,
    M, N, K, r, R, slab_scale, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_tm, stride_g_idx, stride_g_n, stride_ym, stride_yn,
    P: tl.constexpr, HAS_SLAB: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if HAS_SLAB:  # seed the accumulator with the low-rank term
        acc = add_low_rank_slab(
            acc, t_ptr, g_ptr, idx_ptr, r, R, slab_scale, offs_m, offs_n, mask_m, mask_n,
            stride_tm, stride_g_idx, stride_g_n, P, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, mask_m, mask_k, UPCAST)
        w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, mask_k, mask_n, UPCAST)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)

    store_output_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS, UPCAST)


def gemm_with_slab(
    x: torch.Tensor,
    w: torch.Tensor,
    t: torch.Tensor | None,
    g: torch.Tensor,
    g_rows_dim: int,
    active: torch.Tensor,
    slab_scale: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x[M, K] @ w[N, K]ᵀ + slab_scale · t[M, P] @ G_actᵀ (+ bias)`` in x's dtype, ``[M, N]``.

    Module ``j`` of ``g`` is ``g.select(g_rows_dim, j)``, a vector of length N. ``t=None`` skips the slab.
    """
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bucket = t.shape[1] if t is not None else 16
    e, slab = x.element_size(), t is not None
    record(
        "gemm_with_slab",
        2 * m * n * k + slab * 2 * m * n * bucket,
        (m * k + n * k + m * n + (bias is not None) * n) * e + slab * (m * bucket * 4 + n * active.numel() * e),
    )
    with device_guard(x):
        _gemm_with_slab_kernel[
            lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
        ](
            x, w, t if t is not None else x, g, active, bias if bias is not None else x, y,
            m, n, k, active.numel(), g.shape[g_rows_dim], slab_scale, token_bucket(m),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            t.stride(0) if t is not None else 0, g.stride(g_rows_dim), g.stride(1 - g_rows_dim),
            y.stride(0), y.stride(1),
            P=bucket, HAS_SLAB=t is not None, HAS_BIAS=bias is not None,
            UPCAST=upcast_in_kernel(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        )  # fmt: skip
    return y


# --------------------------------------------------------------------------------------------------
# reduce_over_m: out[S, ROWS, P] partial sums of X[M, ROWS]ᵀ @ T[M, P] over S splits of M
# --------------------------------------------------------------------------------------------------


@autotune(
    [
        triton.Config({"BLOCK_ROWS": br, "BLOCK_M": bm}, num_warps=w, num_stages=s)
        for br, bm, w, s in [(128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3)]
    ],
    triton.Config({"BLOCK_ROWS": 64, "BLOCK_M": 64}),
    key=["M_BUCKET", "ROWS", "P"],
)
@triton.jit(do_not_specialize=TOKEN_ARGS)
def _reduce_over_m_kernel(
    x_ptr, t_ptr, out_ptr,
    M, ROWS, M_PER_SPLIT, M_BUCKET,
    stride_xm, stride_xr, stride_tm, stride_os, stride_or,
    P: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_r = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_p = tl.arange(0, P)
    mask_r = offs_r < ROWS
    m_start = pid_s * M_PER_SPLIT
    m_end = tl.minimum(M, m_start + M_PER_SPLIT)
    acc = tl.zeros((BLOCK_ROWS, P), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        xt = load_tile(x_ptr, offs_r, offs_m, stride_xr, stride_xm, mask_r, mask_m, UPCAST)
        t = load_tile(t_ptr, offs_m, offs_p, stride_tm, 1, mask_m, offs_p < P, False)
        acc = tl.dot(xt, t.to(xt.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + pid_s * stride_os + offs_r[:, None] * stride_or + offs_p[None, :], acc, mask=mask_r[:, None])


def _num_splits(m: int, rows: int, device: torch.device) -> int:
    """Splits of M that fill the GPU (about two programs per SM); one in the interpreter."""
    if INTERPRET:
        return 1
    sms = multiprocessors(device)
    row_blocks = triton.cdiv(rows, 128)
    return max(1, min(triton.cdiv(2 * sms, row_blocks), triton.cdiv(m, 256), 64))


def reduce_over_m(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x[M, ROWS]ᵀ @ t[M, P]`` in fp32, ``[ROWS, P]``, reduced over deterministic splits of M."""
    m, rows = x.shape
    bucket = t.shape[1]
    splits = _num_splits(m, rows, x.device)
    # Splits are a multiple of 256 rows, so the autotuner's BLOCK_M always divides them.
    m_per_split = triton.cdiv(triton.cdiv(m, splits), 256) * 256
    splits = triton.cdiv(m, m_per_split)
    partial = torch.empty((splits, rows, bucket), device=x.device, dtype=torch.float32)
    record("reduce_over_m", 2 * m * rows * bucket, m * rows * x.element_size() + m * bucket * 4 + partial.numel() * 4)
    with device_guard(x):
        _reduce_over_m_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]), splits)](
            x, t, partial,
            m, rows, m_per_split, token_bucket(m),
            x.stride(0), x.stride(1), t.stride(0), partial.stride(0), partial.stride(1),
            P=bucket, UPCAST=upcast_in_kernel(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        )  # fmt: skip
    return partial[0] if splits == 1 else partial.sum(0)
