"""NF4 in bitsandbytes' layout: ``quantize_nf4``, ``dequantize_nf4`` and the in-place ``fold_nf4_`` / ``unfold_nf4_``."""

from __future__ import annotations

import torch

from .._checks import check_float_dtype, check_tensor, check_writable_once
from .._runtime import INTERPRET, rank_bucket
from ..fold import fold_
from ..fold._args import check_fold_args
from . import _triton
from .layout import BLOCKSIZES, NF4Weight, as_nf4
from .naive import dequantize_nf4_reference, fold_nf4_reference, nf4_code, quantize_nf4_reference


def _use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or INTERPRET


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, absmax_code: torch.Tensor | None = None) -> NF4Weight:
    """NF4-quantise ``weight`` (any shape; fp32, fp16 or bf16) exactly as ``bitsandbytes.functional.quantize_4bit``.

    Returns new tensors: packed ``uint8 [ceil(numel / 2), 1]``, fp32 absmax per block of ``blocksize``
    consecutive values. With ``absmax_code`` (the 256 sorted fp32 levels of bitsandbytes'
    ``create_dynamic_map()``, on weight's device) absmax is double-quantised in blocks of 256.
    """
    check_tensor("weight", weight)
    check_float_dtype("weight", weight)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if absmax_code is not None:
        check_tensor("absmax_code", absmax_code, ndim=1)
        if absmax_code.numel() != 256 or absmax_code.dtype != torch.float32 or absmax_code.device != weight.device:
            raise ValueError(
                f"absmax_code must be 256 float32 levels on {weight.device}, got {absmax_code.numel()} "
                f"{absmax_code.dtype} on {absmax_code.device}"
            )
    if not _use_triton(weight.device):
        return quantize_nf4_reference(weight, blocksize, absmax_code)
    flat = weight.reshape(-1).contiguous()
    blocks = -(-flat.numel() // blocksize)
    packed = torch.empty(((flat.numel() + 1) // 2, 1), dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=weight.device)
    code = nf4_code(weight.device)
    if flat.numel():
        _triton.quantize(flat, code, blocksize, packed, absmax)
    nf4 = NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize, code)
    if absmax_code is not None:
        nf4.absmax = torch.empty(blocks, dtype=torch.uint8, device=weight.device)
        nf4.absmax2 = torch.empty(-(-blocks // nf4.blocksize2), dtype=torch.float32, device=weight.device)
        nf4.offset = torch.empty((), dtype=torch.float32, device=weight.device)
        nf4.code2 = absmax_code
        if blocks:
            _triton.quantize_absmax(absmax, nf4)
    return nf4


def dequantize_nf4(param, quant_state=None) -> torch.Tensor:
    """The dequantised weight (``quant_state.shape``, ``quant_state.dtype``), bit-identical to
    ``bitsandbytes.functional.dequantize_4bit``. ``param``: a ``Params4bit``, a packed tensor with its
    ``quant_state``, or an ``NF4Weight``."""
    nf4 = as_nf4(param, quant_state)
    if not _use_triton(nf4.device):
        return dequantize_nf4_reference(nf4)
    out = torch.empty(nf4.shape, dtype=nf4.dtype, device=nf4.device)
    if nf4.numel:
        _triton.dequantize(nf4, out)
    return out


def fold_nf4_(param, lora_a, lora_b, indices, scale, quant_state=None):
    """Fold ``scale · B[:, idx] A[idx, :]`` into a 4-bit NF4 weight in place; returns ``param``.

    ``param`` is a bitsandbytes ``Params4bit`` (or a packed tensor with ``quant_state``, or an
    ``NF4Weight``) of a 2-D ``[N, K]`` weight; its packed codes and quant state (absmax, and with double
    quantisation the nested codes, absmax2 and offset) are rewritten in place on their device.
    lora_a ``[R, K]``, lora_b ``[N, R]`` in the weight's dtype; indices as for ``kernels.fold_``.

    Each value becomes ``quantize(round(dequantize(W) + s · Σ_j b_nj a_jk))`` with fresh block absmax:
    what ``quantize_4bit(dequantize_4bit(W) + Δ)`` gives, up to fp32-vs-exact ties at the NF4 thresholds.
    Weights whose rows hold whole blocks (``K % blocksize == 0``, every LLM layer) take one fused
    kernel with no ``[N, K]`` temporary; other shapes dequantise into a temporary, fold, re-quantise.
    Rounding to 4 bits loses most of a small Δ: see the README for the measured fidelity.
    """
    _fold_nf4(param, lora_a, lora_b, indices, scale, quant_state, 1.0)
    return param


def unfold_nf4_(param, lora_a, lora_b, indices, scale, quant_state=None):
    """``fold_nf4_`` with ``-scale`` (does not undo a fold exactly: each fold rounds to 4 bits)."""
    _fold_nf4(param, lora_a, lora_b, indices, scale, quant_state, -1.0)
    return param


def _fold_nf4(param, lora_a, lora_b, indices, scale, quant_state, sign: float) -> None:
    nf4 = as_nf4(param, quant_state)
    if len(nf4.shape) != 2:
        raise ValueError(f"param must hold a 2-D [N, K] weight, got quant_state shape {tuple(nf4.shape)}")
    scale, indices = check_fold_args("param", tuple(nf4.shape), nf4.dtype, nf4.device, lora_a, lora_b, indices, scale)
    for name, tensor in (("param (its packed codes)", nf4.packed), ("quant_state.absmax", nf4.absmax)):
        check_writable_once(name, tensor)
    scale *= sign
    if indices.numel() == 0 or nf4.numel == 0:
        return
    if not _use_triton(nf4.device):
        _assign(nf4, fold_nf4_reference(nf4, lora_a, lora_b, indices, scale))
        return
    new_absmax = torch.empty(nf4.blocks, dtype=torch.float32, device=nf4.device) if nf4.nested else nf4.absmax
    if nf4.shape[1] % nf4.blocksize == 0:
        _triton.fold(nf4, lora_a, lora_b, indices, rank_bucket(indices.numel()), scale, new_absmax)
    else:
        dense = dequantize_nf4(nf4)
        fold_(dense, lora_a, lora_b, indices, scale)
        _triton.quantize(dense.view(-1), nf4.code, nf4.blocksize, nf4.packed, new_absmax)
    if nf4.nested:
        _triton.quantize_absmax(new_absmax, nf4)


def _assign(nf4: NF4Weight, new: NF4Weight) -> None:
    """Copy a freshly quantised weight into ``nf4``'s tensors (the owner's storage)."""
    nf4.packed.view(-1).copy_(new.packed.view(-1))
    nf4.absmax.copy_(new.absmax)
    if nf4.nested:
        nf4.absmax2.copy_(new.absmax2)
        nf4.offset.copy_(new.offset)
