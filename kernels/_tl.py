"""Triton device functions shared by the kernels (called from inside ``@triton.jit`` code)."""

import triton
import triton.language as tl

from ._runtime import MIN_RANK_BUCKET

MIN_RANK = tl.constexpr(MIN_RANK_BUCKET)  # modules per tensor-core step of a low-rank slab


@triton.jit
def load_tile(ptr, offs_0, offs_1, stride_0, stride_1, mask_0, mask_1, UPCAST: tl.constexpr):
    """Masked ``[len(offs_0), len(offs_1)]`` tile at ``ptr`` (zeros outside), in fp32 when ``UPCAST``."""
    tile = tl.load(
        ptr + offs_0[:, None] * stride_0 + offs_1[None, :] * stride_1, mask=mask_0[:, None] & mask_1[None, :], other=0.0
    )
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def load_modules(idx_ptr, r, R, P: tl.constexpr):
    """``(modules, valid)``, both ``[P]``: the first ``r`` entries of the contiguous index array at ``idx_ptr``
    (int64, 0 beyond ``r``) and which of them to use. Indices are checked on the host before a launch; an
    index outside ``[0, R)`` (a promise broken after the check) is skipped, never read out of bounds."""
    offs_p = tl.arange(0, P)
    modules = tl.load(idx_ptr + offs_p, mask=offs_p < r, other=0).to(tl.int64)
    return modules, (offs_p < r) & (modules >= 0) & (modules < R)


@triton.jit
def round_to(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``dtype``. The interpreter truncates fp32 -> bf16, so there
    (``UPCAST``) bf16 rounding is done on the bit pattern first, which makes the final cast exact."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        x = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of output tile ``pid`` in grouped order: GROUP_M consecutive row blocks walk
    the columns together, so that neighbouring programs share rows of X (and columns of W) in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % rows_in_group, (pid % group_size) // rows_in_group


@triton.jit
def add_low_rank_slab(
    acc, t_ptr, g_ptr, idx_ptr, r, R, slab_scale, offs_m, offs_n, mask_m, mask_n,
    stride_tm, stride_g_idx, stride_g_n,
    P: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """``acc + slab_scale · t[offs_m, :P] @ G_act[:, offs_n]``: the low-rank term as one extra K-slab.

    ``t`` is fp32 ``[M, P]``; module ``p < r`` of ``G`` (``R`` modules) is the vector at
    ``g_ptr + idx[p] * stride_g_idx``. Added 16 modules at a time, so that the operands in registers stay
    small whatever P (a whole ``[BLOCK_M, 64]`` t tile beside the accumulator made large tiles spill).
    """
    for p0 in tl.static_range(0, P, MIN_RANK):
        offs_p = p0 + tl.arange(0, MIN_RANK)
        rows, active = load_modules(idx_ptr + p0, r - p0, R, MIN_RANK)
        t = load_tile(t_ptr, offs_m, offs_p, stride_tm, 1, mask_m, offs_p < P, False)
        g = load_tile(g_ptr, rows, offs_n, stride_g_idx, stride_g_n, active, mask_n, UPCAST)
        acc = tl.dot((t * slab_scale).to(g.dtype), g, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def store_output_tile(
    acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """Add the bias (when given) to the fp32 tile ``acc`` and store it, rounded once, in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = round_to(acc, y_ptr.dtype.element_ty, UPCAST)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y, mask=mask_m[:, None] & mask_n[None, :])
