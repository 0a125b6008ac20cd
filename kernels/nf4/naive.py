"""Plain-torch references of NF4 quantise / dequantise / fold in bitsandbytes' layout (``layout.py``).

Rounding rules, shared with the Triton kernels: values are scaled by ``x * (1 / absmax)`` (absmax
clamped to 1e-38 for the reciprocal) and take the nearest level, ties to the lower one, i.e. they are
bucketed against the midpoints of consecutive levels. This is what bitsandbytes' torch and CUDA paths
do for 4-bit codes and its CUDA path does for the 8-bit nested absmax codes.
"""

from __future__ import annotations

import torch

from .layout import NF4_LEVELS, NF4Weight

_TINY = 1e-38


def nf4_code(device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _blockwise_codes(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (int64, one per value) and fp32 absmax per block of the flat fp32 ``values``."""
    n = values.numel()
    padded = torch.nn.functional.pad(values, (0, -n % blocksize)).view(-1, blocksize)
    absmax = padded.abs().amax(1)
    scaled = padded * (1.0 / absmax.clamp(min=_TINY))[:, None]
    bounds = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, bounds).view(-1)[:n], absmax


def quantize_nf4_reference(weight: torch.Tensor, blocksize: int = 64, absmax_code: torch.Tensor | None = None) -> NF4Weight:
    """NF4 codes of ``weight`` (any shape, fp32/fp16/bf16); nested absmax when ``absmax_code`` (256 levels) is given."""
    code = nf4_code(weight.device)
    q, absmax = _blockwise_codes(weight.reshape(-1).float(), code, blocksize)
    q = torch.nn.functional.pad(q, (0, q.numel() % 2), value=7)  # odd numel: the pad value 0 has code 7
    packed = ((q[0::2] << 4) | q[1::2]).to(torch.uint8).unsqueeze(1)
    nf4 = NF4Weight(packed, absmax, weight.shape, weight.dtype, blocksize, code)
    if absmax_code is not None:
        nf4.offset = absmax.mean()
        qabs, nf4.absmax2 = _blockwise_codes(absmax - nf4.offset, absmax_code, nf4.blocksize2)
        nf4.absmax = qabs.to(torch.uint8)
        nf4.code2 = absmax_code
    return nf4


def block_absmax_reference(nf4: NF4Weight) -> torch.Tensor:
    """fp32 absmax per block (nested: ``code2[q] * absmax2 + offset``, each step rounded to fp32)."""
    if not nf4.nested:
        return nf4.absmax
    scale2 = nf4.absmax2.repeat_interleave(nf4.blocksize2)[: nf4.blocks]
    return nf4.code2[nf4.absmax.long()] * scale2 + nf4.offset


def dequantize_nf4_reference(nf4: NF4Weight) -> torch.Tensor:
    """``code[q] * absmax`` in fp32, rounded once to ``nf4.dtype``, shape ``nf4.shape``."""
    q = torch.stack([nf4.packed.view(-1) >> 4, nf4.packed.view(-1) & 15], 1).view(-1)[: nf4.numel].long()
    scale = block_absmax_reference(nf4).repeat_interleave(nf4.blocksize)[: nf4.numel]
    return (nf4.code[q] * scale).to(nf4.dtype).view(nf4.shape)


def fold_nf4_reference(
    nf4: NF4Weight, lora_a: torch.Tensor, lora_b: torch.Tensor, indices: torch.Tensor, scale: float
) -> NF4Weight:
    """``quantize(round(dequantize(W) + scale · B[:, idx] A[idx, :]))`` as a new NF4Weight: the sum in
    float64, rounded once to the weight's dtype, re-quantised with fresh absmax (and nested statistics)."""
    index = indices.long()
    delta = lora_b[:, index].double() @ lora_a[index].double()
    folded = (dequantize_nf4_reference(nf4).double() + scale * delta).to(nf4.dtype)
    return quantize_nf4_reference(folded, nf4.blocksize, nf4.code2 if nf4.nested else None)
