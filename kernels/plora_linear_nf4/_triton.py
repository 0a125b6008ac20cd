"""GEMM over an NF4 weight with the dequantisation inside the K loop (no dequantised weight in memory).

``Y[M, N] = X[M, K] @ deq(W)[N, K]ᵀ + slab_scale · T[M, P] @ G[idx, N-range]ᵀ (+ bias)``: the same
extra low-rank K-slab as ``plora_linear._triton.gemm_with_slab``, but W is read as packed 4-bit codes
(a quarter of the bf16 bytes) and dequantised tile by tile, each value rounded to the weight's dtype
exactly as bitsandbytes' dequantisation rounds it. Needs rows of whole blocks and ``BLOCK_K``
dividing the block size (so a K-step reads one absmax per row); the launcher checks.

The dequantisation is redone for every M-tile, so this kernel saves memory traffic at small M and
costs ALU work at large M; ``op.py`` picks it only for small M. It autotunes on ``M_BUCKET``
(``token_bucket(M)``), as ``gemm_with_slab`` does. On sm_90 and later, tiles of fewer than 64 rows compute
``(X Wᵀ)ᵀ = W Xᵀ`` (``SWAP_AB``), so that the dequantised W tile is the tensor cores' 64-row operand and the
loop runs wgmma rather than mma.sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cost import record
from .._runtime import ACTIVE_SET_ARGS, TOKEN_ARGS, autotune, device_guard, token_bucket, upcast_in_kernel
from .._tl import add_low_rank_slab, grouped_tile, round_to, store_output_tile
from ..nf4._triton import block_absmax

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

#: K-step of every config: divides every block size the fused path accepts.
BLOCK_K = 64


def _configs(swap_small_m: bool) -> list[triton.Config]:
    """The search space; with ``swap_small_m`` the configs of fewer than 64 rows run the swapped product (wgmma)."""
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": BLOCK_K, "GROUP_M": 8, "SWAP_AB": swap_small_m and bm < 64},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, w, s in [(16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3)]
    ]


@autotune(
    _configs(swap_small_m=True),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": BLOCK_K, "GROUP_M": 4, "SWAP_AB": True}),
    key=["M_BUCKET", "N", "K", "P", "HAS_SLAB", "HAS_BIAS", "NESTED", "BLOCKSIZE", "BLOCKSIZE2", "W_DTYPE", "W_UPCAST"],
    before_hopper=_configs(swap_small_m=False),  # mma.sync takes 16 rows anyway; the swapped tile spills there
)
@triton.jit(do_not_specialize=ACTIVE_SET_ARGS + TOKEN_ARGS)
def _gemm_nf4_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    t_ptr, g_ptr, idx_ptr, bias_ptr, y_ptr,
    M, N, K, r, R, slab_scale, M_BUCKET,
    stride_xm, stride_xk, stride_tm, stride_g_idx, stride_g_n, stride_ym, stride_yn,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, W_DTYPE: tl.constexpr, W_UPCAST: tl.constexpr,
    P: tl.constexpr, HAS_SLAB: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_dtype = x_ptr.dtype.element_ty

    if HAS_SLAB:  # seed the accumulator with the low-rank term
        acc = add_low_rank_slab(
            acc, t_ptr, g_ptr, idx_ptr, r, R, slab_scale, offs_m, offs_n, mask_m, mask_n,
            stride_tm, stride_g_idx, stride_g_n, P, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    # With SWAP_AB the loop computes (X Wᵀ)ᵀ = W Xᵀ, so that N, not a small M, is the tensor cores' 64-row side
    # (Hopper's wgmma needs 64 rows; with M = 16 or 32 rows the loop would fall back to mma.sync).
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    row_start = offs_n.to(tl.int64) * K  # flat index of each weight row
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
        byte = tl.load(
            packed_ptr + (row_start[:, None] + k0) // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=mask_n[:, None], other=0
        )
        byte = byte.to(tl.int32)
        scale = block_absmax(
            (row_start + k0) // BLOCKSIZE, mask_n, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, NESTED, BLOCKSIZE2
        )
        hi = round_to(tl.load(code_ptr + (byte >> 4)) * scale[:, None], W_DTYPE, W_UPCAST)
        lo = round_to(tl.load(code_ptr + (byte & 15)) * scale[:, None], W_DTYPE, W_UPCAST)
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # [BLOCK_N, BLOCK_K], values in column order
        if UPCAST or W_UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x_dtype)
        if SWAP_AB:
            acc_t = tl.dot(w, tl.trans(x), acc_t, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if SWAP_AB:
        acc += tl.trans(acc_t)
    store_output_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS, UPCAST)


def supports(nf4) -> bool:
    """Whether the fused kernel can read ``nf4``: 2-D, rows of whole blocks, blocks of >= BLOCK_K values."""
    return len(nf4.shape) == 2 and nf4.blocksize % BLOCK_K == 0 and nf4.shape[1] % nf4.blocksize == 0


def gemm_nf4_with_slab(x, nf4, t, g, g_rows_dim: int, active, slab_scale: float, bias):
    """``x[M, K] @ deq(W)ᵀ + slab_scale · t @ G_actᵀ (+ bias)`` in x's dtype; module ``j`` of ``g`` is
    ``g.select(g_rows_dim, j)``, a vector of length N; ``t=None`` skips the slab. Requires ``supports(nf4)``."""
    m, k = x.shape
    n = nf4.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    absmax2, code2, offset = (nf4.absmax2, nf4.code2, nf4.offset) if nf4.nested else (nf4.absmax,) * 3
    e, slab, bucket = x.element_size(), t is not None, t.shape[1] if t is not None else 0
    record(
        "gemm_nf4_with_slab",
        2 * m * n * k + slab * 2 * m * n * bucket,
        (m * k + m * n + (bias is not None) * n) * e
        + nf4.packed.numel()
        + nf4.absmax.numel() * nf4.absmax.element_size()
        + slab * (m * bucket * 4 + n * active.numel() * e),
    )
    with device_guard(x):
        _gemm_nf4_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
            x, nf4.packed, nf4.absmax, absmax2, code2, offset, nf4.code,
            t if t is not None else x, g, active, bias if bias is not None else x, y,
            m, n, k, active.numel(), g.shape[g_rows_dim], slab_scale, token_bucket(m),
            x.stride(0), x.stride(1), t.stride(0) if t is not None else 0, g.stride(g_rows_dim), g.stride(1 - g_rows_dim),
            y.stride(0), y.stride(1),
            BLOCKSIZE=nf4.blocksize, NESTED=nf4.nested, BLOCKSIZE2=nf4.blocksize2, W_DTYPE=_TL_DTYPE[nf4.dtype],
            W_UPCAST=upcast_in_kernel(nf4.dtype),
            P=t.shape[1] if t is not None else 16, HAS_SLAB=t is not None, HAS_BIAS=bias is not None,
            UPCAST=upcast_in_kernel(x.dtype), DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        )  # fmt: skip
    return y
