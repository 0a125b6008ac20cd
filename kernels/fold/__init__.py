"""In-place fold of PLoRA modules into a dense base weight (``op.py``), its Triton kernel (``_triton.py``)
and torch reference (``naive.py``)."""

from .naive import fold_reference
from .op import fold_, unfold_

__all__ = ["fold_", "fold_reference", "unfold_"]
