"""The fused PLoRA linear op over an NF4 base weight (``op.py``), its in-kernel-dequantising GEMM
(``_triton.py``) and torch reference (``naive.py``)."""

from .naive import plora_linear_nf4_reference
from .op import plora_linear_nf4

__all__ = ["plora_linear_nf4", "plora_linear_nf4_reference"]
