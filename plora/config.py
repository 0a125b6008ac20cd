"""``PLoRAConfig``: what to adapt and how (global rank, scale, targets, dropout, initialisation)."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

_INITS = ("kaiming", "gaussian")

#: The layers adapted when ``target_modules`` is not given, by ``model.config.model_type``: attention query
#: and value projections, as PEFT's LoRA defaults.
DEFAULT_TARGET_MODULES = {
    "bert": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
}


@dataclass
class PLoRAConfig:
    """Configuration of a PLoRA adaptation, read by :func:`plora.inject`.

    Attributes:
        r: global rank ``R``: every adapted layer holds ``R`` one-rank modules.
        alpha: the scale of every module is ``alpha / r`` (the same for all modules of a layer, so
            folding a module never changes the function); a finite real number, as are the values of
            ``alpha_pattern`` (NaN, infinities, bools and strings are refused).
        target_modules: which ``nn.Linear`` / bitsandbytes ``Linear4bit`` modules to adapt, as in PEFT:
            a list of names (a module matches when its full name equals an entry or ends with
            ``"." + entry``), a single string taken as a regular expression that must match the full
            name, or ``"all-linear"`` (every linear layer but the output head); ``None``: the default of
            the model's type (``DEFAULT_TARGET_MODULES``), resolved by :func:`plora.inject`.
        alpha_pattern: optional per-layer ``alpha``: regular expression over the full module name
            (searched, first match wins) to ``alpha``; layers that match none use ``alpha``.
        dropout: dropout probability on the adapter input during training (0 keeps the fused path;
            above 0 the base GEMM and the adapter run separately, as in PEFT).
        init: ``"kaiming"`` (``A`` Kaiming-uniform, ``B`` zero: LoRA's default) or ``"gaussian"``
            (``A ~ N(0, 1/r²)``, ``B`` zero).
        modules_to_save: names (same matching as ``target_modules`` lists) of extra modules whose
            parameters stay trainable and belong to the adapter state, e.g. ``["classifier"]``.
        adapter_dtype: dtype of the master adapter parameters; ``None`` uses the base weight's dtype
            (fp32 for 4-bit bases). They are cast to the compute dtype for the fused op.
    """

    r: int = 8
    alpha: float = 16.0
    target_modules: list[str] | str | None = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    dropout: float = 0.0
    init: str = "kaiming"
    modules_to_save: list[str] | None = None
    adapter_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer (the global rank R), got {self.r!r}")
        _check_alpha("alpha", self.alpha)
        if self.alpha_pattern is not None and not isinstance(self.alpha_pattern, Mapping):
            raise TypeError(f"alpha_pattern must map regular expressions to alphas, got {type(self.alpha_pattern).__name__}")
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for pattern, alpha in self.alpha_pattern.items():
            if not isinstance(pattern, str):
                raise TypeError(f"alpha_pattern keys must be regular expressions (str), got {pattern!r}")
            re.compile(pattern)
            _check_alpha(f"alpha_pattern[{pattern!r}]", alpha)
        if isinstance(self.target_modules, str):
            if self.target_modules != "all-linear":
                re.compile(self.target_modules)
        elif self.target_modules is not None:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
                raise TypeError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}")
        if self.adapter_dtype is not None and self.adapter_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"adapter_dtype must be float32, float16, bfloat16 or None, got {self.adapter_dtype}")
        self.modules_to_save = list(self.modules_to_save or [])

    def scale_for(self, name: str) -> float:
        """The module scale ``alpha / r`` of the layer called ``name``."""
        for pattern, alpha in self.alpha_pattern.items():
            if re.search(pattern, name):
                return float(alpha) / self.r
        return float(self.alpha) / self.r


def _check_alpha(name: str, alpha) -> None:
    """``alpha`` must be a finite real number (not a bool): it becomes every module's scale ``alpha / r``."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"{name} must be a finite real number, got {alpha!r} ({type(alpha).__name__})")
    if not math.isfinite(alpha):
        raise ValueError(f"{name} must be a finite real number, got {alpha!r}")


def default_target_modules(model) -> list[str]:
    """``DEFAULT_TARGET_MODULES`` of ``model.config.model_type``; ``ValueError`` for a type without one."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"no default target_modules for model type {model_type!r}: name the layers to adapt in target_modules")
    return list(DEFAULT_TARGET_MODULES[model_type])


def name_matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a regex string must match the full name; a list entry must equal it or be its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)
