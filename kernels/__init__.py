"""Triton kernels of Fed-PLoRA, each with a plain-torch reference beside it.

Depends on torch and triton only. Note: this import name is shared with Hugging Face's ``kernels``
package; transformers and bitsandbytes probe for that package, and this one deliberately offers
none of its API, so they fall back to their own paths (tested in ``tests/test_ecosystem.py``).
"""

from .fold import fold_, unfold_
from .nf4 import dequantize_nf4, fold_nf4_, quantize_nf4, unfold_nf4_
from .plora_linear import plora_linear, plora_linear_reference
from .plora_linear_nf4 import plora_linear_nf4, plora_linear_nf4_reference

__all__ = [
    "dequantize_nf4",
    "fold_",
    "fold_nf4_",
    "quantize_nf4",
    "unfold_",
    "unfold_nf4_",
    "plora_linear",
    "plora_linear_reference",
    "plora_linear_nf4",
    "plora_linear_nf4_reference",
]
