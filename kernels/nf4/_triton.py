"""Triton kernels for NF4 in bitsandbytes' layout (see ``layout.py``; rounding rules in ``naive.py``).

* ``dequantize``: packed codes -> values of the weight's dtype (flat, any numel);
* ``quantize``: values -> packed codes and fp32 absmax (flat, any numel);
* ``quantize_absmax``: fp32 absmax -> nested 8-bit codes and absmax2 (double quantisation);
* ``fold``: in place, per ``[BLOCK_N, BLOCK_K]`` tile of a weight whose rows hold whole blocks
  (``K % blocksize == 0``): dequantise, round to the weight's dtype, add ``s · B[:, idx] A[idx, :]``
  (one ``tl.dot`` per nibble half), round again, re-quantise with the tile's fresh absmax.

Every launch disables fp contraction (``enable_fp_fusion=False``), so ``code2[q] * absmax2 + offset``
and ``w + s · delta`` round exactly as the separate torch operations of bitsandbytes and the
references do, and divisions are IEEE (``div_rn``). None of these kernels is autotuned: most write in
place, where a tuning run would change live data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cost import record
from .._runtime import ACTIVE_SET_ARGS, INTERPRET, device_guard, upcast_in_kernel
from .._tl import load_modules, round_to

_TINY = tl.constexpr(1e-38)  # absmax floor for the reciprocal, as bitsandbytes clamps it


@triton.jit
def block_absmax(blocks, mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr):
    """fp32 absmax of the 4-bit blocks ``blocks`` (any shape), nested statistics dequantised."""
    if NESTED:
        q = tl.load(absmax_ptr + blocks, mask=mask, other=0).to(tl.int32)
        level = tl.load(code2_ptr + q)
        scale2 = tl.load(absmax2_ptr + blocks // BLOCKSIZE2, mask=mask, other=0.0)
        absmax = level * scale2 + tl.load(offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + blocks, mask=mask, other=0.0)
    return absmax


@triton.jit
def nf4_codes(scaled, bounds_ptr):
    """Index of the nearest NF4 level (ties to the lower): the number of level midpoints below ``scaled``."""
    q = tl.zeros(scaled.shape, dtype=tl.int32)
    for i in tl.static_range(15):
        q += (scaled > tl.load(bounds_ptr + i)).to(tl.int32)
    return q


@triton.jit
def _dequantize_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, out_ptr,
    numel,
    BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    half: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    first = blocks[:, None] * BLOCKSIZE + 2 * tl.arange(0, half)[None, :]  # element of the high nibble
    in_range = first < numel
    byte = tl.load(packed_ptr + first // 2, mask=in_range, other=0).to(tl.int32)
    scale = block_absmax(blocks, blocks * BLOCKSIZE < numel, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, NESTED, BLOCKSIZE2)
    hi = tl.load(code_ptr + (byte >> 4)) * scale[:, None]
    lo = tl.load(code_ptr + (byte & 15)) * scale[:, None]
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + first, round_to(hi, dtype, UPCAST), mask=in_range)
    tl.store(out_ptr + first + 1, round_to(lo, dtype, UPCAST), mask=first + 1 < numel)


@triton.jit
def _quantize_kernel(
    x_ptr, bounds_ptr, packed_ptr, absmax_ptr,
    numel,
    BLOCKSIZE: tl.constexpr, BLOCKS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    half: tl.constexpr = BLOCKSIZE // 2
    blocks = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    first = blocks[:, None] * BLOCKSIZE + 2 * tl.arange(0, half)[None, :]
    hi = tl.load(x_ptr + first, mask=first < numel, other=0.0).to(tl.float32)
    lo = tl.load(x_ptr + first + 1, mask=first + 1 < numel, other=0.0).to(tl.float32)
    absmax = tl.maximum(tl.max(tl.abs(hi), axis=1), tl.max(tl.abs(lo), axis=1))
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, _TINY))
    byte = (nf4_codes(hi * inverse[:, None], bounds_ptr) << 4) | nf4_codes(lo * inverse[:, None], bounds_ptr)
    tl.store(packed_ptr + first // 2, byte.to(tl.uint8), mask=first < numel)
    tl.store(absmax_ptr + blocks, absmax, mask=blocks * BLOCKSIZE < numel)


@triton.jit
def _quantize_absmax_kernel(
    absmax_ptr, offset_ptr, code2_ptr, qabsmax_ptr, absmax2_ptr,
    blocks,
    BLOCKSIZE2: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    offs = pid * BLOCKSIZE2 + tl.arange(0, BLOCKSIZE2)
    mask = offs < blocks
    x = tl.load(absmax_ptr + offs, mask=mask, other=0.0) - tl.load(offset_ptr)
    x = tl.where(mask, x, 0.0)
    absmax2 = tl.max(tl.abs(x), axis=0)
    scaled = x * tl.math.div_rn(tl.full(x.shape, 1.0, tl.float32), tl.zeros_like(x) + tl.maximum(absmax2, _TINY))
    # Largest level <= scaled by bisection over the 256 sorted levels, then the nearer of it and the next.
    low = tl.zeros(scaled.shape, dtype=tl.int32)
    for step in tl.static_range(8):
        candidate = low + (128 >> step)  # never above 255: the steps add up to 255
        low = tl.where(tl.load(code2_ptr + candidate) <= scaled, candidate, low)
    upper = tl.minimum(low + 1, 255)
    midpoint = (tl.load(code2_ptr + low) + tl.load(code2_ptr + upper)) / 2
    q = tl.where((low < 255) & (scaled > midpoint), upper, low)
    tl.store(qabsmax_ptr + offs, q.to(tl.uint8), mask=mask)
    tl.store(absmax2_ptr + pid, absmax2)


@triton.jit(do_not_specialize=ACTIVE_SET_ARGS)
def _fold_kernel(
    packed_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, code_ptr, bounds_ptr, new_absmax_ptr,
    a_ptr, b_ptr, idx_ptr,
    N, K, r, R, scale,
    stride_ar, stride_ak, stride_bn, stride_br,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE2: tl.constexpr, P: tl.constexpr,
    W_DTYPE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    GROUPS: tl.constexpr = BLOCK_K // BLOCKSIZE
    HALF_K: tl.constexpr = BLOCK_K // 2
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + 2 * tl.arange(0, HALF_K)  # column of each high nibble
    mask_n = offs_n < N
    mask = mask_n[:, None] & (cols < K)[None, :]

    # Low-rank term of the tile, separately for even and odd columns: [BLOCK_N, P] @ [P, BLOCK_K / 2].
    modules, active = load_modules(idx_ptr, r, R, P)
    b = tl.load(
        b_ptr + offs_n[:, None] * stride_bn + modules[None, :] * stride_br, mask=mask_n[:, None] & active[None, :], other=0.0
    )
    a_ptrs = a_ptr + modules[:, None] * stride_ar + cols[None, :] * stride_ak
    a_mask = active[:, None] & (cols < K)[None, :]
    a_hi = tl.load(a_ptrs, mask=a_mask, other=0.0)
    a_lo = tl.load(a_ptrs + stride_ak, mask=a_mask, other=0.0)
    if UPCAST:
        b = b.to(tl.float32)
        a_hi = a_hi.to(tl.float32)
        a_lo = a_lo.to(tl.float32)
    delta_hi = tl.dot(b, a_hi, input_precision=DOT_PRECISION)
    delta_lo = tl.dot(b, a_lo, input_precision=DOT_PRECISION)

    # Dequantise: the weight's values as bitsandbytes returns them (rounded to its dtype).
    first = offs_n.to(tl.int64)[:, None] * K + cols[None, :]
    byte = tl.load(packed_ptr + first // 2, mask=mask, other=0).to(tl.int32)
    blocks = tl.reshape(first // BLOCKSIZE, (BLOCK_N, GROUPS, BLOCKSIZE // 2))
    blocks = tl.max(blocks, axis=2)  # every entry of a group is the same block
    block_mask = tl.max(tl.reshape(mask.to(tl.int32), (BLOCK_N, GROUPS, BLOCKSIZE // 2)), axis=2) > 0
    old = block_absmax(blocks, block_mask, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, NESTED, BLOCKSIZE2)
    old = tl.reshape(tl.broadcast_to(old[:, :, None], (BLOCK_N, GROUPS, BLOCKSIZE // 2)), (BLOCK_N, HALF_K))
    hi = round_to(tl.load(code_ptr + (byte >> 4)) * old, W_DTYPE, UPCAST).to(tl.float32)
    lo = round_to(tl.load(code_ptr + (byte & 15)) * old, W_DTYPE, UPCAST).to(tl.float32)

    # Add, round once to the weight's dtype, re-quantise with the new absmax of each block.
    hi = round_to(hi + scale * delta_hi, W_DTYPE, UPCAST).to(tl.float32)
    lo = round_to(lo + scale * delta_lo, W_DTYPE, UPCAST).to(tl.float32)
    magnitude = tl.reshape(tl.maximum(tl.abs(hi), tl.abs(lo)), (BLOCK_N, GROUPS, BLOCKSIZE // 2))
    absmax = tl.max(magnitude, axis=2)
    inverse = tl.math.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, _TINY))
    inverse = tl.reshape(tl.broadcast_to(inverse[:, :, None], (BLOCK_N, GROUPS, BLOCKSIZE // 2)), (BLOCK_N, HALF_K))
    byte = (nf4_codes(hi * inverse, bounds_ptr) << 4) | nf4_codes(lo * inverse, bounds_ptr)
    tl.store(packed_ptr + first // 2, byte.to(tl.uint8), mask=mask)
    tl.store(new_absmax_ptr + blocks, absmax, mask=block_mask)


# --------------------------------------------------------------------------------------------------
# Launchers (arguments already checked; ``nf4`` is a validated layout.NF4Weight)
# --------------------------------------------------------------------------------------------------

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _blocks_per_program(blocksize: int) -> int:
    """Blocks handled by one program: 2048 values on a GPU, 16384 in the interpreter (programs run serially)."""
    return max(1, (16384 if INTERPRET else 2048) // blocksize)


def _nested_args(nf4):
    if nf4.nested:
        return nf4.absmax2, nf4.code2, nf4.offset
    return nf4.absmax, nf4.absmax, nf4.absmax  # placeholders, never read


def midpoints(code: torch.Tensor) -> torch.Tensor:
    """The 15 midpoints between consecutive levels, computed as bitsandbytes does (fp32 ``(a + b) / 2``)."""
    return (code[:-1] + code[1:]) / 2


def dequantize(nf4, out: torch.Tensor) -> torch.Tensor:
    """Fill contiguous ``out`` (``nf4.numel`` values of ``nf4.dtype``) with the dequantised weight."""
    per_program = _blocks_per_program(nf4.blocksize)
    stats = nf4.absmax.numel() * nf4.absmax.element_size()
    record("dequantize_nf4", 0, nf4.packed.numel() + stats + out.numel() * out.element_size())
    with device_guard(out):
        _dequantize_kernel[(triton.cdiv(nf4.blocks, per_program),)](
            nf4.packed, nf4.absmax, *_nested_args(nf4), nf4.code, out,
            nf4.numel,
            BLOCKSIZE=nf4.blocksize, BLOCKS=per_program, NESTED=nf4.nested, BLOCKSIZE2=nf4.blocksize2,
            UPCAST=upcast_in_kernel(nf4.dtype), enable_fp_fusion=False,
        )  # fmt: skip
    return out


def quantize(x: torch.Tensor, code: torch.Tensor, blocksize: int, packed: torch.Tensor, absmax: torch.Tensor) -> None:
    """Write NF4 codes of contiguous ``x`` into ``packed`` and fp32 block maxima into ``absmax``."""
    per_program = _blocks_per_program(blocksize)
    blocks = absmax.numel()
    with device_guard(x):
        _quantize_kernel[(triton.cdiv(blocks, per_program),)](
            x, midpoints(code), packed, absmax,
            x.numel(),
            BLOCKSIZE=blocksize, BLOCKS=per_program, UPCAST=upcast_in_kernel(x.dtype), enable_fp_fusion=False,
        )  # fmt: skip


def quantize_absmax(absmax: torch.Tensor, nf4) -> None:
    """Double quantisation: ``nf4.offset = mean(absmax)`` and nested codes of ``absmax - offset`` into
    ``nf4.absmax`` / ``nf4.absmax2`` (in place)."""
    nf4.offset.copy_(absmax.mean())  # torch's reduction, the same bitsandbytes uses
    with device_guard(absmax):
        _quantize_absmax_kernel[(nf4.absmax2.numel(),)](
            absmax, nf4.offset, nf4.code2, nf4.absmax, nf4.absmax2,
            absmax.numel(),
            BLOCKSIZE2=nf4.blocksize2, enable_fp_fusion=False,
        )  # fmt: skip


def _fold_block_shape(blocksize: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)``: 32 x 256 values per program on a GPU, 64 x 1024 in the interpreter."""
    if INTERPRET:
        return 64, max(1024, blocksize), 4
    return 32, max(256, blocksize), 8


def fold(nf4, lora_a, lora_b, indices, bucket: int, scale: float, new_absmax: torch.Tensor) -> None:
    """In-place fold into ``nf4`` (rows of whole blocks); fp32 block maxima go to ``new_absmax``
    (which is ``nf4.absmax`` itself unless nested)."""
    n, k = nf4.shape
    block_n, block_k, warps = _fold_block_shape(nf4.blocksize)
    with device_guard(nf4.packed):
        _fold_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            nf4.packed, nf4.absmax, *_nested_args(nf4), nf4.code, midpoints(nf4.code), new_absmax,
            lora_a, lora_b, indices,
            n, k, indices.numel(), lora_a.shape[0], scale,
            lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
            BLOCKSIZE=nf4.blocksize, NESTED=nf4.nested, BLOCKSIZE2=nf4.blocksize2, P=bucket,
            W_DTYPE=_TL_DTYPE[nf4.dtype], UPCAST=upcast_in_kernel(nf4.dtype),
            DOT_PRECISION="ieee" if nf4.dtype == torch.float32 else "tf32",
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, enable_fp_fusion=False,
        )  # fmt: skip
