"""``plora_linear_nf4``: the fused PLoRA linear op over a 4-bit NF4 base weight (checks, autograd, launches)."""

from __future__ import annotations

import torch

from .._checks import check_adapters, check_bias, check_float_dtype, check_indices, check_same_device, check_scale, check_tensor
from .._runtime import INTERPRET, rank_bucket
from ..nf4 import as_nf4, dequantize_nf4
from ..plora_linear._triton import gemm_with_slab, reduce_over_m, shrink
from . import _triton
from .naive import plora_linear_nf4_reference

#: Largest M (tokens) for which ``dequant="auto"`` dequantises inside the GEMM. Not yet measured on a
#: GPU: the in-kernel dequantisation is repeated per M-tile, so it can only win while the GEMM is
#: bound by reading W (decoding, small batches).
FUSED_MAX_M = 128


class _PLoRALinearNF4Function(torch.autograd.Function):
    """``x deq(W)ᵀ + s · (x A_actᵀ) B_actᵀ + bias`` on 2-D ``x``; saves ``x`` and ``t`` (fp32 ``[M, P]``)."""

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, bias, nf4, active, scale, fused, trainable):
        count = active.numel()
        t = shrink(x, lora_a, 0, active, rank_bucket(count), 1.0) if count else None
        if fused:
            y = _triton.gemm_nf4_with_slab(x, nf4, t, lora_b, active, scale, bias)
        else:
            y = gemm_with_slab(x, _dense(nf4, x.dtype), t, lora_b, 1, active, scale, bias)
        ctx.save_for_backward(x, t, lora_a, lora_b, active)
        ctx.nf4, ctx.scale, ctx.trainable = nf4, scale, trainable
        return y

    @staticmethod
    def backward(ctx, dy):
        x, t, lora_a, lora_b, active = ctx.saved_tensors
        need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        scale, count, trainable = ctx.scale, active.numel(), ctx.trainable
        dt = shrink(dy, lora_b, 1, active, t.shape[1], scale) if count and (need_x or need_a) else None
        dx = da = db = dbias = None
        if need_x:
            # dx = dy deq(W) + dt A_act through a dequantised temporary (freed on return).
            dx = gemm_with_slab(dy, _dense(ctx.nf4, dy.dtype).T, dt, lora_a, 0, active, 1.0, None)
        # Only the first ``trainable`` modules of ``active`` get gradients; the others are frozen terms.
        if need_a:
            da = torch.zeros_like(lora_a)
            if trainable:
                da.index_copy_(0, active[:trainable].long(), reduce_over_m(x, dt)[:, :trainable].T.to(da.dtype))
        if need_b:
            db = torch.zeros_like(lora_b)
            if trainable:
                db.index_copy_(1, active[:trainable].long(), (reduce_over_m(dy, t)[:, :trainable] * scale).to(db.dtype))
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, da, db, dbias, None, None, None, None, None


def _dense(nf4, dtype: torch.dtype) -> torch.Tensor:
    weight = dequantize_nf4(nf4)
    return weight if weight.dtype == dtype else weight.to(dtype)


def plora_linear_nf4(
    x: torch.Tensor,
    param,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    *,
    quant_state=None,
    dequant: str = "auto",
    trainable: int | None = None,
) -> torch.Tensor:
    """Fused PLoRA linear layer over an NF4 base: ``y = x deq(W)ᵀ + scale · Σ_{j ∈ active} (x · a_j) b_jᵀ + bias``.

    Args:
        x: ``[..., K]`` activations (fp32, fp16 or bf16).
        param: the ``[N, K]`` base weight as a bitsandbytes ``Params4bit`` (NF4), a packed tensor with
            ``quant_state=``, or a ``kernels.nf4.NF4Weight``; on x's device. Dequantised values are
            bitsandbytes' (rounded to the quant state's dtype), then taken in x's dtype.
        lora_a, lora_b, active, scale, bias: as for ``kernels.plora_linear``.
        trainable: how many leading modules of ``active`` get gradients (default: all). The others are
            evaluated but frozen: the exact alternative to folding them into the 4-bit weight.
        dequant: ``"temporary"`` dequantises W into an ``[N, K]`` temporary and runs the fused GEMM of
            ``plora_linear``; ``"fused"`` dequantises inside the GEMM's K loop (needs rows of whole
            blocks of >= 64 values); ``"auto"`` takes ``"fused"`` for M <= ``FUSED_MAX_M`` where possible.

    Returns ``[..., N]`` in x's dtype (fp32 accumulation). Gradients flow to ``x`` (through a
    dequantised temporary), ``lora_a``, ``lora_b`` (zero outside the trainable modules) and ``bias``;
    the 4-bit weight is frozen.
    """
    check_tensor("x", x, min_ndim=1)
    nf4 = as_nf4(param, quant_state)
    if len(nf4.shape) != 2:
        raise ValueError(f"param must hold a 2-D [N, K] weight, got quant_state shape {tuple(nf4.shape)}")
    n, k = nf4.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have last dimension K = {k} (from param [N, K]), got shape {tuple(x.shape)}")
    check_float_dtype("x", x)
    check_same_device("param", nf4.packed, x.device)
    rank = check_adapters(lora_a, lora_b, (n, k), "param", x.dtype, x.device, "x")
    check_bias(bias, n, x)
    check_indices("active", active, rank, x.device)
    scale = check_scale("scale", scale)
    if trainable is None:
        trainable = active.numel()
    if isinstance(trainable, bool) or not isinstance(trainable, int) or not 0 <= trainable <= active.numel():
        raise ValueError(f"trainable must be an int in [0, {active.numel()}] (the length of active), got {trainable!r}")
    if dequant not in ("auto", "fused", "temporary"):
        raise ValueError(f"dequant must be 'auto', 'fused' or 'temporary', got {dequant!r}")
    if dequant == "fused" and not _triton.supports(nf4):
        raise ValueError(
            f"dequant='fused' needs rows of whole blocks of >= {_triton.BLOCK_K} values, got shape {tuple(nf4.shape)} "
            f"with blocksize {nf4.blocksize}; use 'temporary' or 'auto'"
        )

    leading = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.shape[0] == 0 or not (x.is_cuda or INTERPRET):
        return plora_linear_nf4_reference(x, nf4, lora_a, lora_b, active, scale, bias, trainable)
    fused = dequant == "fused" or (dequant == "auto" and x2.shape[0] <= FUSED_MAX_M and _triton.supports(nf4))
    y = _PLoRALinearNF4Function.apply(x2, lora_a, lora_b, bias, nf4, active, scale, fused, trainable)
    return y.reshape(*leading, n)
