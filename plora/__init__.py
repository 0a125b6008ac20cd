"""PLoRA layers for transformers models: config, injection, Select-N-Fold, adapter I/O, PEFT interop.

Depends on ``kernels`` (the fused op and the fold kernels), torch, transformers-free otherwise
except for PEFT export/import.
"""

from .config import PLoRAConfig
from .inject import inject, plora_layers
from .io import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from .layer import PLoRALinear
from .select import select_and_fold, unfold

__all__ = [
    "PLoRAConfig",
    "PLoRALinear",
    "adapter_state_dict",
    "inject",
    "load_adapter",
    "load_adapter_state_dict",
    "plora_layers",
    "save_adapter",
    "select_and_fold",
    "unfold",
]
