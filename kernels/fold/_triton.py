"""Triton kernel of the fold: ``W[N, K] += scale · B[:, idx] A[idx, :]`` in place, one output tile per program.

Each program reads its ``[BLOCK_N, BLOCK_K]`` tile of W once, computes the low-rank term of that tile
with one ``tl.dot`` (``[BLOCK_N, P] @ [P, BLOCK_K]``, fp32 accumulation), adds it in fp32 and writes the
tile back with a single rounding. Nothing of size ``[N, K]`` is ever allocated; the traffic is one
read and one write of W plus the (small) gathered adapter slices. The index count ``r`` is a runtime
argument and the index tensor is padded to the bucket ``P``, so changing the folded set never
recompiles. No autotuning: the kernel writes in place, and tuning would re-run it on live data.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._runtime import ACTIVE_SET_ARGS, INTERPRET, device_guard, upcast_in_kernel
from .._tl import load_modules, round_to


@triton.jit(do_not_specialize=ACTIVE_SET_ARGS)
def _fold_kernel(
    w_ptr, a_ptr, b_ptr, idx_ptr,
    N, K, r, R, scale,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    P: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    modules, active = load_modules(idx_ptr, r, R, P)
    b = tl.load(
        b_ptr + offs_n[:, None] * stride_bn + modules[None, :] * stride_br,
        mask=mask_n[:, None] & active[None, :],
        other=0.0,
    )
    a = tl.load(
        a_ptr + modules[:, None] * stride_ar + offs_k[None, :] * stride_ak,
        mask=active[:, None] & mask_k[None, :],
        other=0.0,
    )
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    delta = tl.dot(b, a, input_precision=DOT_PRECISION)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
    mask = mask_n[:, None] & mask_k[None, :]
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptrs, round_to(w + scale * delta, w_ptr.dtype.element_ty, UPCAST), mask=mask)


def _block_shape(n: int, k: int) -> tuple[int, int, int]:
    """``(BLOCK_N, BLOCK_K, num_warps)``: 64x128 tiles on a GPU (32 KiB of bf16 in flight per program),
    the largest tile the shape needs in the interpreter (it runs programs one by one)."""
    if INTERPRET:
        return min(128, max(16, triton.next_power_of_2(n))), min(256, max(16, triton.next_power_of_2(k))), 4
    return 64, 128, 8


def fold_launch(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, bucket: int, scale: float
) -> None:
    """``weight += scale · lora_b[:, indices] @ lora_a[indices]`` in place (arguments already checked)."""
    n, k = weight.shape
    block_n, block_k, warps = _block_shape(n, k)
    with device_guard(weight):
        _fold_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            weight, lora_a, lora_b, indices,
            n, k, indices.numel(), lora_a.shape[0], scale,
            weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
            P=bucket, UPCAST=upcast_in_kernel(weight.dtype),
            DOT_PRECISION="ieee" if weight.dtype == torch.float32 else "tf32",
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
        )  # fmt: skip
