"""``plora_linear_nf4``: the fused PLoRA linear op over a 4-bit NF4 base weight (checks, custom ops with
autograd, launches).

As ``plora_linear``, the Triton path is a pair of ``torch.library`` custom ops, ``plora::linear_nf4`` and
``plora::linear_nf4_backward``, so that ``torch.compile`` traces it as one node; the NF4 weight enters
them as its tensors, sizes and dtype (``_flatten``). Eager calls run the same bodies as an
``autograd.Function``, ``_LinearNF4Function`` (or the forward body alone when autograd records nothing),
which skips the dispatcher (bit-identical results). The forward and backward are ``plora_linear``'s
``formulas`` with the Triton kernels; only the base product differs (NF4, dequantised in the GEMM or
into a temporary).
"""

from __future__ import annotations

import functools

import torch

from .._checks import check_adapters, check_bias, check_float_dtype, check_indices, check_same_device, check_scale, check_tensor
from .._runtime import INTERPRET
from ..nf4 import NF4Weight, as_nf4, dequantize_nf4
from ..plora_linear import formulas
from ..plora_linear.op import fake_grads, fake_outputs, records_graph, spread_grads
from . import _triton
from .naive import plora_linear_nf4_reference

#: Largest M (tokens) for which ``dequant="auto"`` dequantises inside the GEMM. Not yet measured on a
#: GPU: the in-kernel dequantisation is repeated per M-tile, so it can only win while the GEMM is
#: bound by reading W (decoding, small batches).
FUSED_MAX_M = 128


def _linear_nf4_forward(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    bias: torch.Tensor | None,
    nf4_tensors: list[torch.Tensor],
    nf4_sizes: list[int],
    nf4_dtype: torch.dtype,
    active: torch.Tensor,
    scale: float,
    fused: bool,
    trainable: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, t)`` on 2-D ``x``: ``formulas.forward`` with ``W = deq(W)`` (``t`` is kept for backward).

    The NF4 weight comes as ``_flatten`` gives it; ``trainable`` is for the autograd formula only."""
    active = check_indices("active", active, lora_a.shape[0], x.device)  # see ``plora::linear``
    nf4 = _unflatten(nf4_tensors, nf4_sizes, nf4_dtype)
    if fused:
        return formulas.forward(x, nf4, lora_a, lora_b, active, scale, bias, gemm=_triton.gemm_nf4_with_slab)
    return formulas.forward(x, _dense(nf4, x.dtype), lora_a, lora_b, active, scale, bias)


def _linear_nf4_backward_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    active: torch.Tensor,
    nf4_tensors: list[torch.Tensor],
    nf4_sizes: list[int],
    nf4_dtype: torch.dtype,
    scale: float,
    trainable: int,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Those of ``(dx, dA, dB)`` that ``needs`` asks for; ``dx`` through a dequantised temporary (freed on return)."""
    active = check_indices("active", active, lora_a.shape[0], x.device)  # a CPU tensor may have changed since
    nf4 = _unflatten(nf4_tensors, nf4_sizes, nf4_dtype)
    weight_t = lambda: _dense(nf4, dy.dtype).T
    return formulas.backward(dy, x, t, weight_t, lora_a, lora_b, active, scale, needs, trainable)


def _setup_context(ctx, inputs, output):
    x, lora_a, lora_b, _, nf4_tensors, nf4_sizes, nf4_dtype, active, scale, _, trainable = inputs
    ctx.save_for_backward(x, output[1], lora_a, lora_b, active, *nf4_tensors)
    ctx.nf4_sizes, ctx.nf4_dtype, ctx.scale, ctx.trainable = nf4_sizes, nf4_dtype, scale, trainable
    ctx.mark_non_differentiable(output[1])  # t: saved for backward, never differentiated
    ctx.set_materialize_grads(False)  # so no zero gradient is built for it


def _backward(linear_nf4_backward, ctx, dy, _):
    """The autograd formula of ``(y, t)``, with ``linear_nf4_backward`` (the custom op or its body) for
    ``(dx, dA, dB)``; one ``None`` per NF4 tensor, as a custom op's list argument wants."""
    x, t, lora_a, lora_b, active, *nf4_tensors = ctx.saved_tensors
    need_x, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
    needs = [need_x, need_a, need_b]
    grads = (
        linear_nf4_backward(
            dy, x, t, lora_a, lora_b, active, nf4_tensors, ctx.nf4_sizes, ctx.nf4_dtype, ctx.scale, ctx.trainable, needs
        )
        if any(needs)
        else []
    )
    dx, da, db = spread_grads(needs, grads)
    dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_bias else None
    return dx, da, db, dbias, [None] * len(nf4_tensors), None, None, None, None, None, None


# ------------------------------------------------------------------------ custom ops (torch.compile)

_linear_nf4 = torch.library.custom_op("plora::linear_nf4", _linear_nf4_forward, mutates_args=())
_linear_nf4_backward = torch.library.custom_op("plora::linear_nf4_backward", _linear_nf4_backward_grads, mutates_args=())


@_linear_nf4.register_fake
def _(x, lora_a, lora_b, bias, nf4_tensors, nf4_sizes, nf4_dtype, active, scale, fused, trainable):
    return fake_outputs(x, nf4_sizes[0], active)


@_linear_nf4_backward.register_fake
def _(dy, x, t, lora_a, lora_b, active, nf4_tensors, nf4_sizes, nf4_dtype, scale, trainable, needs):
    return fake_grads(dy, x, lora_a, lora_b, needs)


_linear_nf4.register_autograd(functools.partial(_backward, _linear_nf4_backward), setup_context=_setup_context)


# ------------------------------------------------------------------------------------ the eager path


class _LinearNF4Function(torch.autograd.Function):
    """``plora::linear_nf4`` and its autograd formula without the dispatcher: what eager calls run (``forward``
    takes ``ctx`` for the reason given in ``plora_linear``'s ``_LinearFunction``)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _linear_nf4_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy, dt):
        dx, da, db, dbias, _, *others = _backward(_linear_nf4_backward_grads, ctx, dy, dt)
        return dx, da, db, dbias, None, *others  # autograd.Function wants one None for the list of NF4 tensors


def _flatten(nf4: NF4Weight) -> tuple[list[torch.Tensor], list[int], torch.dtype]:
    """An ``NF4Weight`` as custom-op arguments: its tensors (packed, absmax, code, then offset, absmax2 and
    code2 when nested), ``[N, K, blocksize, blocksize2]`` and its dtype."""
    nested = [nf4.offset, nf4.absmax2, nf4.code2] if nf4.nested else []
    return [nf4.packed, nf4.absmax, nf4.code, *nested], [*nf4.shape, nf4.blocksize, nf4.blocksize2], nf4.dtype


def _unflatten(tensors: list[torch.Tensor], sizes: list[int], dtype: torch.dtype) -> NF4Weight:
    packed, absmax, code, *nested = tensors
    n, k, blocksize, blocksize2 = sizes
    return NF4Weight(packed, absmax, torch.Size((n, k)), dtype, blocksize, code, *nested, blocksize2=blocksize2)


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
    the 4-bit weight is frozen. ``torch.compile`` support, including ``fullgraph=True``, and the choice
    between the eager path (an ``autograd.Function``, or its forward body when autograd records nothing)
    and the custom op ``plora::linear_nf4`` while compiling, are as for ``plora_linear``.
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
    if not torch.compiler.is_compiling():  # eager: in argument order (the op's own check is then a cache hit on CUDA)
        active = check_indices("active", active, rank, x.device)
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
    if torch.compiler.is_compiling():
        op = _linear_nf4
    else:
        op = _LinearNF4Function.apply if records_graph(x2, lora_a, lora_b, bias) else _linear_nf4_forward
    y, _ = op(x2, lora_a, lora_b, bias, *_flatten(nf4), active, scale, fused, trainable)
    return y.reshape(*leading, n)
