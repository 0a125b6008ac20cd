"""Triton kernels of Fed-PLoRA (``fed_plora.kernels``), each with a plain-torch reference beside it.

Depends on torch and triton only.
"""

if __name__ == "fed_plora.kernels":
    from .fold import fold_, unfold_
    from .nf4 import dequantize_nf4, fold_nf4_, quantize_nf4, unfold_nf4_
    from .plora_linear import plora_linear, plora_linear_reference
    from .plora_linear_nf4 import plora_linear_nf4, plora_linear_nf4_reference
else:
    # The repository root is on sys.path (a Python started there) and something imported the top-level
    # name ``kernels``, which is Hugging Face's package: hand that import over (see ``_not_ours``).
    from ._not_ours import hand_over

    hand_over(__name__)

__all__ = [
    "dequantize_nf4",
    "fold_",
    "fold_nf4_",
    "plora_linear",
    "plora_linear_nf4",
    "plora_linear_nf4_reference",
    "plora_linear_reference",
    "quantize_nf4",
    "unfold_",
    "unfold_nf4_",
]
