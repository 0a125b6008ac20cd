"""``plora_linear``: the fused PLoRA linear op (argument checks, autograd, kernel launches)."""

from __future__ import annotations

import torch

from .._checks import (
    check_adapters,
    check_bias,
    check_float_dtype,
    check_indices,
    check_same_device,
    check_scale,
    check_tensor,
)
from .._runtime import INTERPRET, rank_bucket
from ._triton import gemm_with_slab, reduce_over_m, shrink
from .naive import plora_linear_reference


class _PLoRALinearFunction(torch.autograd.Function):
    """Forward and backward of ``x Wᵀ + s · (x A_actᵀ) B_actᵀ + bias`` on 2-D ``x``.

    Saved for backward: ``x`` and ``t = x A_actᵀ`` (fp32, ``[M, P]``), plus references to the
    parameters and the index tensor (no copies).
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, active, scale, bias):
        count = active.numel()
        t = shrink(x, lora_a, 0, active, rank_bucket(count), 1.0) if count else None
        y = gemm_with_slab(x, weight, t, lora_b, 1, active, scale, bias)
        ctx.save_for_backward(x, t, weight, lora_a, lora_b, active)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, t, weight, lora_a, lora_b, active = ctx.saved_tensors
        need_x, need_w, need_a, need_b, _, _, need_bias = ctx.needs_input_grad
        scale = ctx.scale
        count = active.numel()
        dt = shrink(dy, lora_b, 1, active, t.shape[1], scale) if count and (need_x or need_a) else None

        dx = dw = da = db = dbias = None
        if need_x:
            # dx = dy W + dt A_act, with W read as its transpose [K, N] through strides.
            dx = gemm_with_slab(dy, weight.T, dt, lora_a, 0, active, 1.0, None)
        if need_a:
            da = torch.zeros_like(lora_a)
            if count:
                da.index_copy_(0, active.long(), reduce_over_m(x, dt)[:, :count].T.to(da.dtype))
        if need_b:
            db = torch.zeros_like(lora_b)
            if count:
                db.index_copy_(1, active.long(), (reduce_over_m(dy, t)[:, :count] * scale).to(db.dtype))
        if need_w:
            dw = (dy.T @ x).to(weight.dtype)
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, da, db, None, None, dbias


def plora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused PLoRA linear layer: ``y = x Wᵀ + scale · Σ_{j ∈ active} (x · a_j) b_jᵀ + bias``.

    Args:
        x: ``[..., K]`` activations (fp32, fp16 or bf16; any leading dims, any strides).
        weight: ``[N, K]`` frozen base weight, x's dtype and device.
        lora_a: ``[R, K]`` module down-projections ``a_j`` (rows).
        lora_b: ``[N, R]`` module up-projections ``b_j`` (columns).
        active: ``[r]`` integer tensor of distinct module indices in ``[0, R)`` on x's device; may be
            empty or hold all R; order is irrelevant. Validated once per tensor version (one tiny
            device-to-host read), so reusing one index tensor costs no host synchronisation.
        scale: the module scale ``s`` (``alpha / R`` by convention).
        bias: optional ``[N]``.

    Returns:
        ``[..., N]`` in x's dtype, computed with fp32 accumulation.

    CUDA tensors run the Triton kernels; so do CPU tensors under ``TRITON_INTERPRET=1`` (tests).
    Other CPU tensors take the plain-torch path (``plora_linear_reference``), since Triton cannot
    launch there.

    Gradients flow to ``x``, ``lora_a`` and ``lora_b`` through the Triton kernels; rows of ``lora_a``
    and columns of ``lora_b`` outside ``active`` get exactly zero. The base weight is meant to be
    frozen: if it does require grad, ``dW = dyᵀ x`` is computed with a plain torch matmul (an
    ``[N, K]`` temporary), and likewise ``dbias = Σ dy`` when the bias requires grad.
    """
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension K = {k} (from weight [N, K]), got shape {tuple(x.shape)}")
    check_float_dtype("x", x)
    check_float_dtype("weight", weight, x.dtype)
    check_same_device("weight", weight, x.device)
    rank = check_adapters(lora_a, lora_b, (n, k), "weight", x.dtype, x.device, "x")
    check_bias(bias, n, x)
    check_indices("active", active, rank, x.device)
    scale = check_scale("scale", scale)

    leading = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0 or not (x.is_cuda or INTERPRET):
        # Nothing to launch, or CPU tensors with no Triton interpreter: Triton cannot run here, so
        # the plain-torch path computes the same function (and zero gradients for inactive modules).
        return plora_linear_reference(x, weight, lora_a, lora_b, active, scale, bias)
    largest = max(x2.shape[0] * max(k, n), weight.numel())
    if largest >= 2**31:
        raise ValueError(
            f"x [{x2.shape[0]}, {k}] -> y [{x2.shape[0]}, {n}] with weight {tuple(weight.shape)} exceeds the kernels' "
            "32-bit offsets (2**31 elements per matrix): split the batch"
        )
    y = _PLoRALinearFunction.apply(x2, weight, lora_a, lora_b, active, scale, bias)
    return y.reshape(*leading, n)
