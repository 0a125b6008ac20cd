"""The NF4 storage layout of bitsandbytes, read without importing bitsandbytes.

A weight of ``numel`` values (row-major) is cut into blocks of ``blocksize`` consecutive values; each
block stores ``absmax`` (fp32) and one 4-bit code per value, two codes per byte with the first value in
the high nibble (``numel`` odd: the last low nibble is padding). With double quantisation ("nested",
bitsandbytes' ``compress_statistics``) ``absmax`` is itself stored as 8-bit codes of
``absmax - offset`` in blocks of 256, with an fp32 ``absmax2`` per block and a 256-entry ``code2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: The 16 NF4 levels (QLoRA, Dettmers et al. 2023), in code order; bitsandbytes stores the same values.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

#: Block sizes the kernels accept (bitsandbytes' set for 4-bit).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass
class NF4Weight:
    """An NF4 weight in bitsandbytes' layout. The tensors are the owner's (no copies), so in-place
    kernels update a bitsandbytes ``Params4bit`` / ``QuantState`` through this view.

    packed ``uint8 [ceil(numel / 2), 1]`` (any shape with that many bytes), absmax ``fp32 [blocks]``
    or, nested, ``uint8 [blocks]`` codes; code ``fp32 [16]``; offset ``fp32 []``, absmax2
    ``fp32 [ceil(blocks / blocksize2)]``, code2 ``fp32 [256]`` when nested.
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    code: torch.Tensor
    offset: torch.Tensor | None = None
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    blocksize2: int = 256

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.packed.device


def as_nf4(weight, quant_state=None, *, name: str = "param") -> NF4Weight:
    """View of a bitsandbytes NF4 weight: a ``Params4bit`` (``weight.quant_state`` is used), a packed
    tensor plus its ``QuantState``, or an ``NF4Weight`` (returned as is). Validates the layout."""
    if isinstance(weight, NF4Weight):
        return _validate(weight, name)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{name} must be a bitsandbytes Params4bit, a packed uint8 tensor or an NF4Weight, got {type(weight).__name__}"
        )
    state = quant_state if quant_state is not None else getattr(weight, "quant_state", None)
    if state is None:
        raise ValueError(f"{name} has no quant_state: pass a quantised Params4bit (moved to its device) or quant_state=")
    if getattr(state, "quant_type", None) != "nf4":
        raise ValueError(f"{name} must be NF4-quantised, got quant_type {getattr(state, 'quant_type', None)!r}")
    packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    if packed.dtype != torch.uint8:
        if not packed.is_contiguous():
            raise ValueError(f"{name} stored as {packed.dtype} must be contiguous to be read as bytes")
        packed = packed.view(torch.uint8)
    state2 = state.state2 if getattr(state, "nested", False) else None
    nf4 = NF4Weight(
        packed=packed,
        absmax=state.absmax,
        shape=torch.Size(state.shape),
        dtype=state.dtype,
        blocksize=int(state.blocksize),
        code=state.code,
        offset=state.offset if state2 is not None else None,
        absmax2=state2.absmax if state2 is not None else None,
        code2=state2.code if state2 is not None else None,
        blocksize2=int(state2.blocksize) if state2 is not None else 256,
    )
    return _validate(nf4, name)


def _validate(nf4: NF4Weight, name: str) -> NF4Weight:
    device = nf4.packed.device
    if nf4.blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} blocksize must be one of {BLOCKSIZES}, got {nf4.blocksize}")
    if nf4.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"{name} must dequantise to float32, float16 or bfloat16, got {nf4.dtype}")
    if not nf4.packed.is_contiguous() or nf4.packed.numel() != (nf4.numel + 1) // 2:
        raise ValueError(
            f"{name} packed data must be {(nf4.numel + 1) // 2} contiguous bytes for shape {tuple(nf4.shape)}, "
            f"got {nf4.packed.numel()} ({'contiguous' if nf4.packed.is_contiguous() else 'strided'})"
        )
    expected = torch.uint8 if nf4.nested else torch.float32
    if nf4.absmax.dtype != expected or nf4.absmax.numel() != nf4.blocks or not nf4.absmax.is_contiguous():
        raise ValueError(
            f"{name} absmax must be {nf4.blocks} contiguous {expected} values, got {nf4.absmax.numel()} {nf4.absmax.dtype}"
        )
    if nf4.code.dtype != torch.float32 or nf4.code.numel() != 16:
        raise ValueError(f"{name} code must be the 16 float32 NF4 levels, got {nf4.code.numel()} {nf4.code.dtype}")
    tensors = [("absmax", nf4.absmax), ("code", nf4.code)]
    if nf4.nested:
        if nf4.blocksize2 not in BLOCKSIZES or nf4.blocksize2 < 64:
            raise ValueError(f"{name} nested blocksize must be one of {BLOCKSIZES[1:]}, got {nf4.blocksize2}")
        blocks2 = -(-nf4.blocks // nf4.blocksize2)
        if nf4.absmax2.dtype != torch.float32 or nf4.absmax2.numel() != blocks2:
            raise ValueError(
                f"{name} nested absmax must be {blocks2} float32 values, got {nf4.absmax2.numel()} {nf4.absmax2.dtype}"
            )
        if nf4.code2 is None or nf4.code2.dtype != torch.float32 or nf4.code2.numel() != 256:
            raise ValueError(f"{name} nested code must be 256 float32 values")
        if nf4.offset is None or nf4.offset.numel() != 1 or nf4.offset.dtype != torch.float32:
            raise ValueError(f"{name} nested offset must be one float32 value")
        tensors += [("nested absmax", nf4.absmax2), ("nested code", nf4.code2), ("offset", nf4.offset)]
    for part, tensor in tensors:
        if tensor.device != device:
            raise ValueError(f"{name} {part} must be on {device} (the device of its packed data), got {tensor.device}")
    return nf4
