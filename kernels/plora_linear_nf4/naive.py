"""Plain-torch reference of the PLoRA linear op over an NF4 base weight."""

from __future__ import annotations

import torch

from ..nf4.layout import NF4Weight
from ..nf4.naive import dequantize_nf4_reference
from ..plora_linear.naive import plora_linear_reference


def plora_linear_nf4_reference(
    x: torch.Tensor,
    nf4: NF4Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    active: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
    trainable: int | None = None,
) -> torch.Tensor:
    """``plora_linear_reference`` on the dequantised weight (bitsandbytes' values, cast to x's dtype);
    modules of ``active`` after the first ``trainable`` enter detached (frozen)."""
    weight = dequantize_nf4_reference(nf4).to(x.dtype)
    y = plora_linear_reference(x, weight, lora_a, lora_b, active[:trainable], scale, bias)
    frozen = active[trainable:] if trainable is not None else active[:0]
    if frozen.numel():
        y = y + plora_linear_reference(x, torch.zeros_like(weight), lora_a.detach(), lora_b.detach(), frozen, scale)
    return y
