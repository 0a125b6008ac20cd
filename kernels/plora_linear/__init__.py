"""The fused PLoRA linear op (``op.py``), its Triton kernels (``_triton.py``) and torch reference (``naive.py``)."""

from .naive import plora_linear_reference
from .op import plora_linear

__all__ = ["plora_linear", "plora_linear_reference"]
