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
from .._tl import add_low_rank_slab, grouped_tile, round_to, store_output_tile
from ..nf4._triton import block_absmax

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

#: K-step of every config: divides every block size the fused path accepts.
BLOCK_K = 64


#: The two NF4 levels of each byte, looked up in registers (``prmt.b32`` byte permutes, no memory access): for 4
#: bytes at a time ($4, the first in its low byte), the high nibbles' levels into $0 (bytes 0, 1) and $1 (bytes 2,
#: 3), the low nibbles' into $2 and $3, first value in the low half. The tables are the levels' low bytes ($5,
#: $9, $13, $17: levels 0-3, 4-7, 8-11, 12-15, first level in byte 0) and high bytes ($21, $25, $29, $33); Triton
#: hands each 32-bit argument over 4 times (``pack=4``), so only every fourth operand is read. Per half of the
#: input word (4 nibbles, in the order low, high of byte 0, low, high of byte 1): ``s`` indexes each nibble's
#: byte among 8 (``prmt`` reads one selector nibble per result byte from the low 16 bits, 3 bits of which pick
#: one of the 8 bytes of its two operands), levels 0-7 and 8-15 are looked up separately and ``c`` keeps for each
#: result byte the one that its nibble's bit 3 chooses. Every input is read before any output is written.
LOOKUP_ASM = tl.constexpr("""{
.reg .b32 s0, s1, c0, c1, a, b, l0, h0, l1, h1;
and.b32 s0, $4, 0x77777777;
shr.b32 s1, s0, 16;
shr.b32 c0, $4, 1;
and.b32 c0, c0, 0x44444444;
or.b32 c0, c0, 0x32103210;
shr.b32 c1, c0, 16;
prmt.b32 a, $5, $9, s0;
prmt.b32 b, $13, $17, s0;
prmt.b32 l0, a, b, c0;
prmt.b32 a, $21, $25, s0;
prmt.b32 b, $29, $33, s0;
prmt.b32 h0, a, b, c0;
prmt.b32 a, $5, $9, s1;
prmt.b32 b, $13, $17, s1;
prmt.b32 l1, a, b, c1;
prmt.b32 a, $21, $25, s1;
prmt.b32 b, $29, $33, s1;
prmt.b32 h1, a, b, c1;
prmt.b32 $0, l0, h0, 0x7351;
prmt.b32 $1, l1, h1, 0x7351;
prmt.b32 $2, l0, h0, 0x6240;
prmt.b32 $3, l1, h1, 0x6240;
}""")
LOOKUP_CONSTRAINTS = tl.constexpr("=r,=r,=r,=r,r" + ",r" * 32)


@triton.jit
def _level_bytes(code_ptr, first: tl.constexpr, HIGH: tl.constexpr, dtype: tl.constexpr):
    """Byte ``HIGH`` (0: low, 1: high) of levels ``first`` to ``first + 3`` of the code rounded to 16-bit ``dtype``,
    packed into one word (level ``first`` in its low byte)."""
    word = tl.full((), 0, tl.uint32)
    for i in tl.static_range(4):
        bits = tl.load(code_ptr + first + i).to(dtype).to(tl.uint16, bitcast=True).to(tl.uint32)
        word |= ((bits >> (8 * HIGH)) & 0xFF) << (8 * i)
    return word


@triton.jit
def _lookup_levels(byte, low_bytes, high_bytes, dtype: tl.constexpr):
    """``(level[byte >> 4], level[byte & 15])`` in 16-bit ``dtype``, from the tables ``_level_bytes`` packs (two
    tuples of 4 words)."""
    zeros = tl.zeros(byte.shape, tl.uint32)
    operands = [byte, zeros + low_bytes[0], zeros + low_bytes[1], zeros + low_bytes[2], zeros + low_bytes[3],
                zeros + high_bytes[0], zeros + high_bytes[1], zeros + high_bytes[2], zeros + high_bytes[3]]  # fmt: skip
    hi, lo = tl.inline_asm_elementwise(
        LOOKUP_ASM, LOOKUP_CONSTRAINTS, operands, dtype=(tl.uint16, tl.uint16), is_pure=True, pack=4
    )
    return hi.to(dtype, bitcast=True), lo.to(dtype, bitcast=True)


def _configs(swap: bool) -> list[triton.Config]:
    """The search space; ``swap``: every config runs the swapped product (see the kernel)."""
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": BLOCK_K, "GROUP_M": 8, "SWAP_AB": swap},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, w, s in [(16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 8, 4), (64, 64, 4, 4)]
    ]


#: Fewest K-steps a program of a split K loop runs.
MIN_SPLIT_STEPS = 8


def splits(tiles: int, k_steps: int, multiprocessors: int, fixed_bytes: float, bytes_per_split: float) -> int:
    """Programs that share one output tile's K loop, chosen by the roofline model: the power of two that minimises
    the launch's memory time, ``(fixed_bytes + splits · bytes_per_split) / min(1, programs / multiprocessors)``
    (a grid of fewer programs than SMs leaves SMs idle, which at decoding sizes, one program per N-tile, is most
    of them; each split adds fp32 partial sums to write and read back), each program running at least
    ``MIN_SPLIT_STEPS`` K-steps."""

    def time(split: int) -> float:
        return (fixed_bytes + (split > 1) * split * bytes_per_split) / min(1.0, tiles * split / multiprocessors)

    candidates = [2**i for i in range(8) if k_steps >= MIN_SPLIT_STEPS * 2**i or i == 0]
    return min(candidates, key=time)


@autotune(
    _configs(swap=True),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": BLOCK_K, "GROUP_M": 4, "SWAP_AB": True}),
    key=[
        *("M_BUCKET", "N", "K", "P", "HAS_SLAB", "HAS_BIAS", "NESTED", "BLOCKSIZE", "BLOCKSIZE2", "W_DTYPE", "W_UPCAST"),
        *("SCALE_AFTER_DOT", "LEVELS_IN_REGISTERS"),
    ],
    before_hopper=_configs(swap=False),  # mma.sync takes 16 rows anyway; the swapped tile spills there
)
@triton.jit(do_not_specialize=ACTIVE_SET_ARGS + TOKEN_ARGS)
def _gemm_nf4_kernel(
    x_ptr, packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr,
    t_ptr, g_ptr, idx_ptr, bias_ptr, y_ptr, partial_ptr, arrived_ptr,
    M, N, K, r, R, slab_scale, M_BUCKET,
    stride_xm, stride_xk, stride_tm, stride_g_idx, stride_g_n, stride_ym, stride_yn,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, W_DTYPE: tl.constexpr, W_UPCAST: tl.constexpr,
    P: tl.constexpr, HAS_SLAB: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALE_AFTER_DOT: tl.constexpr, LEVELS_IN_REGISTERS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP_AB: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split, splits = tl.program_id(1), tl.num_programs(1)  # this program's share of the K loop, out of ``splits``
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), splits)
    k_start = split * steps * BLOCK_K
    k_end = tl.minimum(K, k_start + steps * BLOCK_K)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_dtype = x_ptr.dtype.element_ty

    if HAS_SLAB and split == 0:  # seed the accumulator with the low-rank term (the first share only)
        acc = add_low_rank_slab(
            acc, t_ptr, g_ptr, idx_ptr, r, R, slab_scale, offs_m, offs_n, mask_m, mask_n,
            stride_tm, stride_g_idx, stride_g_n, P, UPCAST, DOT_PRECISION,
        )  # fmt: skip

    # With SWAP_AB the loop computes (X Wᵀ)ᵀ = W Xᵀ, so that N, not a small M, is the tensor cores' 64-row side
    # (Hopper's wgmma needs 64 rows; with M = 16 or 32 rows the loop would fall back to mma.sync).
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    row_start = offs_n.to(tl.int64) * K  # flat index of each weight row
    if LEVELS_IN_REGISTERS:  # the 16 levels in x's dtype, their low and high bytes packed 4 to a word
        low_bytes = (_level_bytes(code_ptr, 0, 0, x_dtype), _level_bytes(code_ptr, 4, 0, x_dtype),
                     _level_bytes(code_ptr, 8, 0, x_dtype), _level_bytes(code_ptr, 12, 0, x_dtype))  # fmt: skip
        high_bytes = (_level_bytes(code_ptr, 0, 1, x_dtype), _level_bytes(code_ptr, 4, 1, x_dtype),
                      _level_bytes(code_ptr, 8, 1, x_dtype), _level_bytes(code_ptr, 12, 1, x_dtype))  # fmt: skip
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_m[:, None], other=0.0)
        byte = tl.load(
            packed_ptr + (row_start[:, None] + k0) // 2 + tl.arange(0, BLOCK_K // 2)[None, :], mask=mask_n[:, None], other=0
        )
        scale = block_absmax(
            (row_start + k0) // BLOCKSIZE, mask_n, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, NESTED, BLOCKSIZE2
        )
        if SCALE_AFTER_DOT:  # 16-bit x: the product of the levels, scaled per row afterwards (one block per K-step)
            if LEVELS_IN_REGISTERS:
                hi, lo = _lookup_levels(byte, low_bytes, high_bytes, x_dtype)
            else:
                code = byte.to(tl.int32)
                hi = round_to(tl.load(code_ptr + (code >> 4)), x_dtype, UPCAST)
                lo = round_to(tl.load(code_ptr + (code & 15)), x_dtype, UPCAST)
        else:  # fp32 x: bitsandbytes' values, each rounded to the weight's dtype
            code = byte.to(tl.int32)
            hi = round_to(tl.load(code_ptr + (code >> 4)) * scale[:, None], W_DTYPE, W_UPCAST)
            lo = round_to(tl.load(code_ptr + (code & 15)) * scale[:, None], W_DTYPE, W_UPCAST)
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # [BLOCK_N, BLOCK_K], values in column order
        if UPCAST or W_UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        else:
            w = w.to(x_dtype)
        if SCALE_AFTER_DOT:
            if SWAP_AB:
                acc_t += tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION) * scale[:, None]
            else:
                acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION) * scale[None, :]
        elif SWAP_AB:
            acc_t = tl.dot(w, tl.trans(x), acc_t, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)

    if SWAP_AB:
        acc += tl.trans(acc_t)
    if splits > 1:  # a split K loop: fp32 partial sums; the tile's last program to finish adds them up, in split order
        mask = mask_m[:, None] & mask_n[None, :]
        partial = partial_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial + split * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial sums are stored before the program counts itself done
        if tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel") == splits - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for other in range(0, splits):
                acc += tl.load(partial + other * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            store_output_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS, UPCAST)
    else:
        store_output_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS, UPCAST)


def supports(nf4) -> bool:
    """Whether the fused kernel can read ``nf4``: 2-D, rows of whole blocks, blocks of >= BLOCK_K values."""
    return len(nf4.shape) == 2 and nf4.blocksize % BLOCK_K == 0 and nf4.shape[1] % nf4.blocksize == 0


def gemm_nf4_with_slab(x, nf4, t, g, g_rows_dim: int, active, slab_scale: float, bias):
    """``x[M, K] @ deq(W)ᵀ + slab_scale · t @ G_actᵀ (+ bias)`` in x's dtype; module ``j`` of ``g`` is
    ``g.select(g_rows_dim, j)``, a vector of length N; ``t=None`` skips the slab. Requires ``supports(nf4)``.

    Where the output tiles of a config do not fill the GPU (decoding sizes), ``splits`` programs share each tile's
    K loop and add up fp32 partial sums in an ``[splits, M, N]`` scratch buffer."""
    m, k = x.shape
    n = nf4.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    absmax2, code2, offset = (nf4.absmax2, nf4.code2, nf4.offset) if nf4.nested else (nf4.absmax,) * 3
    sms, k_steps = multiprocessors(x.device), triton.cdiv(k, BLOCK_K)
    e, slab, bucket = x.element_size(), t is not None, t.shape[1] if t is not None else 0
    operand_bytes = (
        (m * k + m * n + (bias is not None) * n) * e
        + nf4.packed.numel()
        + nf4.absmax.numel() * nf4.absmax.element_size()
        + slab * (m * bucket * 4 + n * active.numel() * e)
    )

    def tiles(meta):
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])

    def split(meta):
        return splits(tiles(meta), k_steps, sms, operand_bytes, 2 * m * n * 4)

    configs = _gemm_nf4_kernel.configs  # the scratch serves whichever config the autotuner runs
    most_tiles = max(tiles(c.kwargs) for c in configs)
    most_splits = max(split(c.kwargs) for c in configs)
    partial = torch.empty((most_splits if most_splits > 1 else 0, m, n), device=x.device, dtype=torch.float32)
    arrived = torch.zeros(most_tiles if most_splits > 1 else 0, device=x.device, dtype=torch.int32)
    record("gemm_nf4_with_slab", 2 * m * n * k + slab * 2 * m * n * bucket, operand_bytes)
    if partial.numel():  # written and read back once (at most: the config the autotuner runs may split less)
        record("gemm_nf4_partial_sums", 0, 2 * partial.numel() * partial.element_size())
    with device_guard(x):
        _gemm_nf4_kernel[lambda meta: (tiles(meta), split(meta))](
            x, nf4.packed, nf4.absmax, absmax2, code2, offset, nf4.code,
            t if t is not None else x, g, active, bias if bias is not None else x, y, partial, arrived,
            m, n, k, active.numel(), g.shape[g_rows_dim], slab_scale, token_bucket(m),
            x.stride(0), x.stride(1), t.stride(0) if t is not None else 0, g.stride(g_rows_dim), g.stride(1 - g_rows_dim),
            y.stride(0), y.stride(1),
            BLOCKSIZE=nf4.blocksize, NESTED=nf4.nested, BLOCKSIZE2=nf4.blocksize2, W_DTYPE=_TL_DTYPE[nf4.dtype],
            W_UPCAST=upcast_in_kernel(nf4.dtype),
            P=t.shape[1] if t is not None else 16, HAS_SLAB=t is not None, HAS_BIAS=bias is not None,
            UPCAST=upcast_in_kernel(x.dtype), DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            SCALE_AFTER_DOT=x.dtype != torch.float32, LEVELS_IN_REGISTERS=not INTERPRET and x.dtype != torch.float32,
        )  # fmt: skip
    return y
