"""PLoRA layers for transformers models: config, injection, Select-N-Fold, merges into the frozen bases and
their snapshots, adapter I/O, PEFT interop.

Uses ``kernels`` (the fused op and the fold kernels), torch, safetensors, bitsandbytes for 4-bit
bases and PEFT for its adapter format.
"""

from .config import PLoRAConfig
from .inject import inject, plora_layers
from .io import adapter_state_dict, load_adapter, load_adapter_state_dict, save_adapter
from .layer import PLoRALinear
from .merge import merge_into_base, restore_bases, snapshot_bases
from .peft_io import export_peft, from_peft
from .select import select_and_fold, unfold

__all__ = [
    "PLoRAConfig",
    "PLoRALinear",
    "adapter_state_dict",
    "export_peft",
    "from_peft",
    "inject",
    "load_adapter",
    "load_adapter_state_dict",
    "merge_into_base",
    "plora_layers",
    "restore_bases",
    "save_adapter",
    "select_and_fold",
    "snapshot_bases",
    "unfold",
]
