"""NF4 in bitsandbytes' layout (``layout.py``): Triton quantise / dequantise / in-place fold (``_triton.py``,
``op.py``) and their torch references (``naive.py``)."""

from .layout import NF4Weight, as_nf4
from .naive import dequantize_nf4_reference, fold_nf4_reference, quantize_nf4_reference
from .op import dequantize_nf4, fold_nf4_, quantize_nf4, unfold_nf4_

__all__ = [
    "NF4Weight",
    "as_nf4",
    "dequantize_nf4",
    "dequantize_nf4_reference",
    "fold_nf4_",
    "fold_nf4_reference",
    "quantize_nf4",
    "quantize_nf4_reference",
    "unfold_nf4_",
]
