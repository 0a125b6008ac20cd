"""One GEMM pass that also computes its own low-rank input: ``gemm_lowrank``.

With ``X [M, L]``, ``W [N, L]``, the active modules ``H_act`` (length L) and ``G_act`` (length N)::

    U        = u_scale · X H_actᵀ                                 [M, P]  fp32, written out
    Y        = X Wᵀ + slab_scale · U G_act (+ bias)               [M, N]
    partials = u_scale · X[rows]ᵀ T[rows]  over disjoint sets of rows, summing to u_scale · Xᵀ T   [slots, L, P]  fp32 (optional)

The forward is ``X = x``, ``W = W0``, ``H = A``, ``G = B`` (``U = t``); the backward's dx is ``X = dy``,
``W = W0ᵀ``, ``H = B``, ``G = A`` (``U = dt``), with the dB partial sums ``dyᵀ t`` taken from the same dy tiles.
So X is read once for everything (the forward's x for y and t, the backward's dy for dx, dt and dB).

Schedule (persistent): the output tiles, row block by row block, are cut into one contiguous run per program (as
many programs as the GPU has SMs). A tile that starts a run or a new row block also accumulates ``U`` in its
L-loop; the program keeps that ``U`` in its own scratch rows and adds it as an extra K-slab to every tile of that
row block it meets. ``U`` is thus computed at most ``programs + row blocks`` times instead of once per tile, and
no program waits for another. A row block's first tile writes its ``U``. With partial sums, the first tiles of
all row blocks come first in the order, each adding its block's partial sums into its program's own slot: they
all lie in the runs of the first ``programs / N-tiles + 1`` programs, so the partial sums take that many
``[L, P]`` slots (each with one writer: deterministic), not one per row block, for one more ``U`` per block.
``BLOCK_M`` is fixed per GPU generation (``block_m``, not tuned), so the slots are sized before the autotuner
picks a config.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._cost import record
from .._runtime import (
    ACTIVE_SET_ARGS,
    TOKEN_ARGS,
    arch,
    autotune,
    device_guard,
    multiprocessors,
    token_bucket,
    upcast_in_kernel,
)
from .._tl import load_modules, load_tile, store_output_tile


def block_m(device: torch.device) -> int:
    """Rows per program: two 64-row Hopper warpgroup tiles on sm_90 and later; 64 on older GPUs, whose ``mma.sync``
    keeps operands in registers (128 rows spill there), and in the interpreter (smaller programs are faster there)."""
    return 128 if arch(device) >= 90 else 64


@triton.jit
def _tile(
    acc, u, x_ptr, w_ptr, h_ptr, h_rows, h_active, offs_m, mask_m, offs_n, mask_n, L,
    stride_xm, stride_xl, stride_wn, stride_wl, stride_h_idx, stride_h_l,
    WITH_U: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """One output tile's L-loop: ``acc += X Wᵀ``, and with ``WITH_U`` also ``u += X H_actᵀ``."""
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        x = load_tile(x_ptr, offs_m, offs_l, stride_xm, stride_xl, mask_m, mask_l, UPCAST)
        w = load_tile(w_ptr, offs_l, offs_n, stride_wl, stride_wn, mask_l, mask_n, UPCAST)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        if WITH_U:
            h = load_tile(h_ptr, offs_l, h_rows, stride_h_l, stride_h_idx, mask_l, h_active, UPCAST)
            u = tl.dot(x, h, u, input_precision=DOT_PRECISION)
    return acc, u


@triton.jit
def _partial_sums(
    part_ptr, x_ptr, t_ptr, offs_m, mask_m, L, part_scale, stride_xm, stride_xl, stride_tm, stride_pl,
    P: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """Add ``part_scale · X[offs_m]ᵀ T[offs_m]`` (``[L, P]``) to the slot at ``part_ptr``, one L-step at a time. A
    loop of its own (the row block was just read, so from L2): beside the tile's accumulators its operands would
    spill. Each thread adds to the elements it stored before, so no barrier is needed between row blocks."""
    offs_p = tl.arange(0, P)
    t = load_tile(t_ptr, offs_m, offs_p, stride_tm, 1, mask_m, offs_p < P, False)
    if not UPCAST:
        t = t.to(x_ptr.dtype.element_ty)
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        x = load_tile(x_ptr, offs_m, offs_l, stride_xm, stride_xl, mask_m, mask_l, UPCAST)
        slot = part_ptr + offs_l[:, None] * stride_pl + offs_p[None, :]
        part = tl.dot(tl.trans(x), t, input_precision=DOT_PRECISION) * part_scale
        tl.store(slot, tl.load(slot, mask=mask_l[:, None], other=0.0) + part, mask=mask_l[:, None])


@autotune(
    [
        triton.Config({"BLOCK_N": bn, "BLOCK_L": bl}, num_warps=w, num_stages=s)
        for bn, bl, w, s in [(128, 64, 8, 4), (128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 8, 4)]
    ],
    triton.Config({"BLOCK_N": 64, "BLOCK_L": 64}),
    key=["M_BUCKET", "N", "L", "P", "HAS_BIAS", "PARTIALS", "BLOCK_M"],
    before_hopper=[
        triton.Config({"BLOCK_N": bn, "BLOCK_L": bl}, num_warps=w, num_stages=3) for bn, bl, w in [(64, 32, 8), (64, 16, 4)]
    ],
)
@triton.jit(do_not_specialize=ACTIVE_SET_ARGS + TOKEN_ARGS)
def _gemm_lowrank_kernel(
    x_ptr, w_ptr, h_ptr, g_ptr, idx_ptr, bias_ptr, t_ptr, y_ptr, u_ptr, part_ptr, scratch_ptr,
    M, N, L, r, R, u_scale, slab_scale, M_BUCKET,
    stride_xm, stride_xl, stride_wn, stride_wl, stride_h_idx, stride_h_l, stride_g_idx, stride_g_n,
    stride_tm, stride_ym, stride_yn, stride_um, stride_pb, stride_pl,
    P: tl.constexpr, HAS_BIAS: tl.constexpr, PARTIALS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    n_tiles = tl.cdiv(N, BLOCK_N)
    m_blocks = tl.cdiv(M, BLOCK_M)
    tiles = m_blocks * n_tiles
    start = tl.program_id(0) * tiles // tl.num_programs(0)
    end = (tl.program_id(0) + 1) * tiles // tl.num_programs(0)
    h_rows, h_active = load_modules(idx_ptr, r, R, P)
    offs_p = tl.arange(0, P)
    rows = tl.arange(0, BLOCK_M)
    scratch = scratch_ptr + tl.program_id(0) * BLOCK_M * P + rows[:, None] * P + offs_p[None, :]  # this program's U
    others = tl.maximum(n_tiles - 1, 1)  # tiles of a row block after its first

    current = -1  # the row block whose U the scratch rows hold
    for tile in range(start, end):
        if PARTIALS:  # the first tiles of all row blocks come first
            owner = tile < m_blocks
            pid_m = tl.where(owner, tile, (tile - m_blocks) // others)
            pid_n = tl.where(owner, 0, 1 + (tile - m_blocks) % others)
        else:  # row block by row block
            pid_m = tile // n_tiles
            pid_n = tile % n_tiles
            owner = pid_n == 0
        offs_m = pid_m * BLOCK_M + rows
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if pid_m != current:  # a new U: the run's first tile, or a new row block
            acc, u = _tile(
                acc, tl.zeros((BLOCK_M, P), dtype=tl.float32), x_ptr, w_ptr, h_ptr, h_rows, h_active,
                offs_m, mask_m, offs_n, mask_n, L, stride_xm, stride_xl, stride_wn, stride_wl, stride_h_idx, stride_h_l,
                True, UPCAST, DOT_PRECISION, BLOCK_L,
            )  # fmt: skip
            u = u * u_scale
            tl.debug_barrier()  # every thread has read the previous U from the scratch rows
            tl.store(scratch, u)
            current = pid_m
            if owner:  # the row block's first tile writes its U and adds its partial sums to the program's slot
                tl.store(u_ptr + offs_m[:, None] * stride_um + offs_p[None, :], u, mask=mask_m[:, None])
                if PARTIALS:
                    _partial_sums(
                        part_ptr + tl.program_id(0) * stride_pb, x_ptr, t_ptr, offs_m, mask_m, L, u_scale,
                        stride_xm, stride_xl, stride_tm, stride_pl, P, UPCAST, DOT_PRECISION, BLOCK_L,
                    )  # fmt: skip
            tl.debug_barrier()  # the scratch rows are read back by other threads of the program
        else:
            acc, _ = _tile(
                acc, acc, x_ptr, w_ptr, h_ptr, h_rows, h_active, offs_m, mask_m, offs_n, mask_n, L,
                stride_xm, stride_xl, stride_wn, stride_wl, stride_h_idx, stride_h_l, False, UPCAST, DOT_PRECISION, BLOCK_L,
            )  # fmt: skip
        slab = tl.load(scratch) * slab_scale
        g = load_tile(g_ptr, h_rows, offs_n, stride_g_idx, stride_g_n, h_active, mask_n, UPCAST)
        acc = tl.dot(slab.to(g.dtype), g, acc, input_precision=DOT_PRECISION)
        store_output_tile(acc, bias_ptr, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, HAS_BIAS, UPCAST)


def gemm_lowrank(
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor,
    h_rows_dim: int,
    g: torch.Tensor,
    g_rows_dim: int,
    active: torch.Tensor,
    bucket: int,
    u_scale: float,
    slab_scale: float,
    bias: torch.Tensor | None,
    t: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(Y, U, partials)`` of the module docstring for ``x [M, L]``, ``w [N, L]``; module ``j`` of ``h`` is
    ``h.select(h_rows_dim, j)`` (length L), of ``g`` ``g.select(g_rows_dim, j)`` (length N). ``Y`` in x's dtype,
    ``U`` fp32 ``[M, bucket]``; ``partials`` fp32 ``[slots, L, bucket]`` summing to ``u_scale · xᵀ t`` (``t`` fp32
    ``[M, bucket]``), None without ``t``."""
    m, l_len = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)
    u = torch.empty((m, bucket), device=x.device, dtype=torch.float32)
    rows = block_m(x.device)
    m_blocks = triton.cdiv(m, rows)
    programs = multiprocessors(x.device)
    # Programs whose runs hold first tiles, whatever the config (every config's BLOCK_N is at most 128).
    slots = min(m_blocks, programs // triton.cdiv(n, 128) + 1)
    partials = None if t is None else torch.zeros((slots, l_len, bucket), device=x.device, dtype=torch.float32)
    scratch = torch.empty((programs, rows, bucket), device=x.device, dtype=torch.float32)
    e, count = x.element_size(), active.numel()
    fresh = min(programs + (1 + (t is not None)) * m_blocks, m_blocks * triton.cdiv(n, 64))  # tiles computing U, at most
    record(
        "gemm_lowrank",
        2 * m * n * l_len + 2 * m * n * bucket + 2 * fresh * rows * l_len * bucket + (t is not None) * 2 * m * l_len * bucket,
        (m * l_len + n * l_len + m * n + count * (l_len + n) + (bias is not None) * n) * e
        + m * bucket * 4 * (1 + (t is not None)) + (t is not None) * m_blocks * l_len * bucket * 8,  # slots: += per block
    )  # fmt: skip
    with device_guard(x):
        _gemm_lowrank_kernel[lambda meta: (min(programs, m_blocks * triton.cdiv(n, meta["BLOCK_N"])),)](
            x, w, h, g, active, bias if bias is not None else x, t if t is not None else u, y, u,
            partials if partials is not None else u, scratch,
            m, n, l_len, count, h.shape[h_rows_dim], u_scale, slab_scale, token_bucket(m),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), h.stride(h_rows_dim), h.stride(1 - h_rows_dim),
            g.stride(g_rows_dim), g.stride(1 - g_rows_dim),
            t.stride(0) if t is not None else 0, y.stride(0), y.stride(1), u.stride(0),
            partials.stride(0) if partials is not None else 0, partials.stride(1) if partials is not None else 0,
            P=bucket, HAS_BIAS=bias is not None, PARTIALS=t is not None,
            UPCAST=upcast_in_kernel(x.dtype), DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            BLOCK_M=rows,
        )  # fmt: skip
    return y, u, partials
