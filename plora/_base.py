"""The frozen base of an adapted layer: ``nn.Linear`` or bitsandbytes ``Linear4bit``.

Reading the weight in a compute dtype, folding modules into it and out of it, merging other factors
into it for good, and pristine snapshots that restore it bit-exactly.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn

from fed_plora.kernels import fold_, fold_nf4_, unfold_


def linear4bit_class():
    """bitsandbytes' ``Linear4bit`` class, or ``None`` while bitsandbytes is not imported (or not importable).

    A model holds a ``Linear4bit`` only once whoever built it imported bitsandbytes, so a model that was built
    without it has none, and bitsandbytes is never imported here for a float model (its import reaches for
    optional Hub kernels and prints their failures)."""
    if "bitsandbytes" not in sys.modules:
        return None
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # bitsandbytes is a dependency, but a broken install must not break float models
        return None
    return Linear4bit


def is_linear4bit(module: nn.Module) -> bool:
    cls = linear4bit_class()
    return cls is not None and isinstance(module, cls)


def is_adaptable(module: nn.Module) -> bool:
    """Whether ``module`` can be the base of a ``PLoRALinear``."""
    return isinstance(module, nn.Linear) or is_linear4bit(module)


def dequantized_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``[N, K]`` weight of a ``Linear4bit`` base in ``dtype`` (a fresh tensor)."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(base.weight.data, base.weight.quant_state).to(dtype)


def fold_into_base(
    base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: list[int], scale: float, *, unfold: bool = False
) -> None:
    """In place: ``W += scale · B[:, indices] A[indices, :]``, or ``-=`` with ``unfold``.

    Float bases use the fold kernels and NF4 bases the NF4 fold kernel (adapters cast to the weight's
    dtype, fp32 accumulation); FP4 bases are dequantised, updated and re-quantised with bitsandbytes'
    own quantiser. A 4-bit fold rounds to 4 bits, so the caller keeps a snapshot to undo it exactly.
    """
    with torch.no_grad():
        index = torch.tensor(indices, dtype=torch.long, device=lora_a.device)
        if not is_linear4bit(base):
            weight = base.weight
            kernel = unfold_ if unfold else fold_
            kernel(weight.data, lora_a.to(weight.dtype), lora_b.to(weight.dtype), index, scale)
            return
        signed = -scale if unfold else scale
        if base.weight.quant_state.quant_type == "nf4":
            dtype = base.weight.quant_state.dtype
            fold_nf4_(base.weight, lora_a.to(dtype), lora_b.to(dtype), index, signed)
        else:
            _fold_4bit_torch(base, lora_a, lora_b, index, signed)


def merge_into_base(base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
    """In place, for good: ``W += scale · lora_b @ lora_a`` with ``lora_a [r, K]``, ``lora_b [N, r]`` (any ``r``),
    through the fold kernels (:func:`fold_into_base` over all ``r`` rows): no ``[N, K]`` temporary.

    The factors are cast to the weight's dtype first (a bf16 base rounds FLoRA's fp32 stacks to bf16: a
    relative error of about 2⁻⁸ in ``ΔW``, below the rounding of ``W`` itself wherever ``‖ΔW‖ ≪ ‖W‖``).
    """
    fold_into_base(base, lora_a, lora_b, list(range(lora_a.shape[0])), scale)


def _fold_4bit_torch(base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, index: torch.Tensor, scale: float) -> None:
    """Fold into an FP4 weight (no kernel covers it): dequantise to fp32, add, re-quantise, same layout."""
    import bitsandbytes.functional as bnbf

    param = base.weight
    state = param.quant_state
    weight = bnbf.dequantize_4bit(param.data, state).float()
    weight.addmm_(lora_b.index_select(1, index).float(), lora_a.index_select(0, index).float(), alpha=scale)
    packed, new_state = bnbf.quantize_4bit(
        weight.to(state.dtype),
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=param.data.dtype,
    )
    param.data.copy_(packed)
    param.quant_state = new_state


def snapshot(base: nn.Module):
    """A copy of the base weight that :func:`restore` writes back bit-exactly.

    Float weights are copied to host memory (so the copy costs no accelerator memory); 4-bit weights
    keep their packed codes and quantisation state (an eighth of a bf16 copy) on their device.
    """
    if is_linear4bit(base):
        return base.weight.data.clone(), copy.deepcopy(base.weight.quant_state)
    return base.weight.detach().to("cpu", copy=True)


def check_snapshot(base: nn.Module, saved) -> None:
    """``TypeError`` / ``ValueError`` unless ``saved`` is a :func:`snapshot` of a base like ``base`` (same
    kind, shape and dtype): what :func:`restore` writes nothing without."""
    if is_linear4bit(base):
        ok = isinstance(saved, tuple) and len(saved) == 2 and isinstance(saved[0], torch.Tensor)
        if not ok:
            raise TypeError(f"the snapshot of a 4-bit base is (packed codes, quant_state), got {type(saved).__name__}")
        current, state = base.weight.data, saved[1]
        if saved[0].shape != current.shape or saved[0].dtype != current.dtype:
            raise ValueError(
                f"the snapshot holds packed codes {tuple(saved[0].shape)} {saved[0].dtype}, "
                f"the base {tuple(current.shape)} {current.dtype}"
            )
        if tuple(getattr(state, "shape", ())) != tuple(base.weight.quant_state.shape):
            raise ValueError(f"the snapshot's quant_state is of another weight shape: {getattr(state, 'shape', None)}")
        return
    if not isinstance(saved, torch.Tensor):
        raise TypeError(f"the snapshot of a float base is a tensor, got {type(saved).__name__}")
    weight = base.weight
    if saved.shape != weight.shape or saved.dtype != weight.dtype:
        raise ValueError(
            f"the snapshot is {tuple(saved.shape)} {saved.dtype}, the base weight {tuple(weight.shape)} {weight.dtype}"
        )


def restore(base: nn.Module, saved) -> None:
    """Write a :func:`snapshot` back into ``base`` (bit-exact)."""
    with torch.no_grad():
        if is_linear4bit(base):
            packed, state = saved
            base.weight.data.copy_(packed)
            base.weight.quant_state = state
        else:
            base.weight.copy_(saved)
