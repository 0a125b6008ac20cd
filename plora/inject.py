"""Injection into a model: replace target linear layers by ``PLoRALinear``, freeze everything else."""

from __future__ import annotations

import dataclasses

from torch import nn

from . import _base
from .config import PLoRAConfig, default_target_modules, name_matches
from .layer import PLoRALinear


def inject(model: nn.Module, config: PLoRAConfig) -> nn.Module:
    """Replace the target ``nn.Linear`` / ``Linear4bit`` modules of ``model`` by ``PLoRALinear``, in place.

    Every parameter is frozen except the adapters and the parameters of ``config.modules_to_save``.
    ``config.target_modules=None`` adapts the default layers of the model's type (``DEFAULT_TARGET_MODULES``).
    The config, with its targets resolved, is kept as ``model.plora_config``. Returns ``model``.

    Raises ``ValueError`` when the model is already injected, when no module matches the targets, when
    a target that names a module matches one that is not a linear layer, or when no targets are given
    for a model type without defaults.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PLoRAConfig):
        raise TypeError(f"config must be a plora.PLoRAConfig, got {type(config).__name__}")
    if plora_layers(model):
        raise ValueError("model already holds PLoRA layers: inject once per model")
    if config.target_modules is None:
        config = dataclasses.replace(config, target_modules=default_target_modules(model))
    targets = _target_names(model, config)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = PLoRALinear(
            getattr(parent, child),
            config.r,
            config.scale_for(name),
            dropout=config.dropout,
            init=config.init,
            adapter_dtype=config.adapter_dtype,
        )
        setattr(parent, child, layer)
    extra = extra_modules(model, config)
    for name, param in model.named_parameters():
        adapter = name.rpartition(".")[2] in ("lora_a", "lora_b")
        param.requires_grad_(adapter or any(name.startswith(m + ".") for m in extra))
    model.plora_config = config
    return model


def plora_layers(model: nn.Module) -> dict[str, PLoRALinear]:
    """The PLoRA layers of ``model`` by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, PLoRALinear)}


def extra_modules(model: nn.Module, config: PLoRAConfig) -> list[str]:
    """Names of the modules that ``config.modules_to_save`` keeps trainable."""
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and name_matches(n, config.modules_to_save)]
    missing = [t for t in config.modules_to_save if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save names modules that the model does not have: {missing}")
    # A module inside another one that is saved adds nothing.
    return [n for n in names if not any(n.startswith(o + ".") for o in names)]


def _target_names(model: nn.Module, config: PLoRAConfig) -> list[str]:
    targets = config.target_modules
    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in model.named_modules() if _base.is_adaptable(m) and m is not head]
    else:
        matched = [(n, m) for n, m in model.named_modules() if n and name_matches(n, targets)]
        wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not _base.is_adaptable(m)]
        # A regex may sweep in containers; named targets must all be linear layers.
        if wrong and not isinstance(targets, str):
            raise ValueError(f"target_modules must name nn.Linear or Linear4bit modules, but these match: {wrong}")
        names = [n for n, m in matched if _base.is_adaptable(m)]
    if not names:
        raise ValueError(f"no nn.Linear or Linear4bit module of the model matches target_modules={targets!r}")
    return names
