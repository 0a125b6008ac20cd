"""``plora_linear``: the fused PLoRA linear op (argument checks, custom ops with autograd, kernel launches).

The forward and backward formulas are ``formulas.forward`` and ``formulas.backward``, run with the Triton
kernels of ``_triton.py``; this module wires them into autograd and ``torch.compile``.

The Triton path is registered with ``torch.library`` as the custom ops ``plora::linear`` (forward) and
``plora::linear_backward``, each with a fake implementation (shapes only), and the forward with an
autograd formula. ``torch.compile`` therefore traces a call as one opaque node in a full graph, forward
and backward, and never steps into the launches. The active-index tensor is an ordinary tensor input:
a new set of the same size changes no guard, and shapes depend on its size only through the rank
bucket.

Eager calls skip the dispatcher, whose Python custom-op machinery costs tens of µs per call
(``bench/op_dispatch.py``): ``_LinearFunction``, an ``autograd.Function``, runs the same bodies as the
custom ops (``_linear_forward``, ``_linear_backward_grads``, ``_backward``), so both paths give
bit-identical values and gradients; a call that autograd does not record (``records_graph``) runs
``_linear_forward`` alone. ``plora_linear`` takes the custom op only while
``torch.compiler.is_compiling()`` (Dynamo tracing, export).
"""

from __future__ import annotations

import functools

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
from . import formulas
from .naive import plora_linear_reference

# ------------------------------------------------------------------------------ pieces shared with NF4


def fake_outputs(x: torch.Tensor, n: int, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty ``(y [M, N], t)`` shaped as a forward op returns them. ``rank_bucket`` of a symbolic size
    guards only on the bucket's bounds, so a compiled graph serves every active set of its bucket."""
    count = active.numel()
    return x.new_empty((x.shape[0], n)), x.new_empty((x.shape[0], rank_bucket(count) if count else 0), dtype=torch.float32)


def records_graph(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` (grad mode on, one of them requiring grad). Eager calls
    that it would not record run the forward body directly, as a custom op does, without ``autograd.Function``."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fake_grads(dy, x, lora_a, lora_b, needs) -> list[torch.Tensor]:
    """Empty gradients shaped as ``formulas.backward`` returns them."""
    grads = (dy.new_empty(x.shape), torch.empty_like(lora_a), torch.empty_like(lora_b))
    return [g for g, need in zip(grads, needs) if need]


def spread_grads(needs: list[bool], grads: list[torch.Tensor]) -> tuple:
    """``(dx, dA, dB)`` from the gradients that were asked for, ``None`` for the others."""
    given = iter(grads)
    return tuple(next(given) if need else None for need in needs)


# ------------------------------------------------------------------------------- forward and backward


def _linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, t)`` on 2-D ``x`` (``formulas.forward``; ``t`` is kept for backward)."""
    # Compiled graphs cannot read the indices while tracing: they are checked here (see ``check_indices``),
    # and the kernels read the contiguous tensor it returns.
    active = check_indices("active", active, lora_a.shape[0], x.device)
    return formulas.forward(x, weight, lora_a, lora_b, active, scale, bias)


def _linear_backward_grads(
    dy: torch.Tensor,
    x: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    needs: list[bool],
) -> list[torch.Tensor]:
    """Those of ``(dx, dA, dB)`` that ``needs`` asks for (``formulas.backward``)."""
    active = check_indices("active", active, lora_a.shape[0], x.device)  # a CPU tensor may have changed since
    return formulas.backward(dy, x, t, lambda: weight.T, lora_a, lora_b, active, scale, needs)


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, active, scale, _ = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b, active)
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])  # t: saved for backward, never differentiated
    ctx.set_materialize_grads(False)  # so no zero gradient is built for it


def _backward(linear_backward, ctx, dy, _):
    """The autograd formula of ``(y, t)``, with ``linear_backward`` (the custom op or its body) for ``(dx, dA, dB)``."""
    x, t, weight, lora_a, lora_b, active = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, _, need_bias = ctx.needs_input_grad
    needs = [need_x, need_a, need_b]
    grads = linear_backward(dy, x, t, weight, lora_a, lora_b, active, ctx.scale, needs) if any(needs) else []
    dx, da, db = spread_grads(needs, grads)
    # A base weight or bias that requires grad (they are meant to be frozen): plain torch, an [N, K] temporary.
    dw = (dy.T @ x).to(weight.dtype) if need_w else None
    dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype) if need_bias else None
    return dx, dw, da, db, None, None, dbias


# ------------------------------------------------------------------------ custom ops (torch.compile)

_linear = torch.library.custom_op("plora::linear", _linear_forward, mutates_args=())
_linear_backward = torch.library.custom_op("plora::linear_backward", _linear_backward_grads, mutates_args=())


@_linear.register_fake
def _(x, weight, lora_a, lora_b, active, scale, bias):
    return fake_outputs(x, weight.shape[0], active)


@_linear_backward.register_fake
def _(dy, x, t, weight, lora_a, lora_b, active, scale, needs):
    return fake_grads(dy, x, lora_a, lora_b, needs)


_linear.register_autograd(functools.partial(_backward, _linear_backward), setup_context=_setup_context)


# ------------------------------------------------------------------------------------ the eager path


class _LinearFunction(torch.autograd.Function):
    """``plora::linear`` and its autograd formula without the dispatcher: what eager calls run.

    ``forward`` takes ``ctx`` and calls ``_setup_context`` itself: a separate ``setup_context`` would make
    ``apply`` bind its arguments through ``inspect.signature`` on every call (tens of µs)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _linear_forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(functools.partial(_backward, _linear_backward_grads))


# --------------------------------------------------------------------------------------------- the op


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
        active: ``[r]`` integer tensor of distinct module indices in ``[0, R)`` on x's device, any
            strides (a non-contiguous one costs a tiny device copy per call); may be empty or hold all R;
            order is irrelevant. A CUDA tensor is validated once per tensor object and version (one tiny
            device-to-host read), so reusing one index tensor costs no host synchronisation; a CPU tensor
            on every call. Changing a validated CUDA tensor without bumping its version counter (``.data``,
            DLPack, raw pointers) is the caller's duty not to do (see ``_checks.check_indices``).
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

    Eager calls run the Triton path as an ``autograd.Function`` (its forward body alone when autograd
    records nothing), which skips the dispatcher. Under ``torch.compile`` (``fullgraph=True`` works) it
    is the custom op ``plora::linear``, forward and backward, with the same bodies, so values and
    gradients are bit-identical: shape, dtype and device checks run while tracing, index values when the
    op runs (as in eager). A new active set of the same size changes no guard;
    with a dynamic size (``torch._dynamo.mark_dynamic``, or Dynamo's automatic dynamic shapes after a size
    change) one graph serves every size of a rank bucket. The plain-torch path is traced as ordinary
    torch code, and its index values are not checked there.
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
    if not torch.compiler.is_compiling():  # eager: in argument order (the op's own check is then a cache hit on CUDA)
        active = check_indices("active", active, rank, x.device)
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
    if torch.compiler.is_compiling():
        op = _linear
    else:
        op = _LinearFunction.apply if records_graph(x2, weight, lora_a, lora_b, bias) else _linear_forward
    y, _ = op(x2, weight, lora_a, lora_b, active, scale, bias)
    return y.reshape(*leading, n)
