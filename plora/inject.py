"""Injection into a model: replace target linear layers by ``PLoRALinear``, freeze everything else."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

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
    a target that names a module matches one that is not a linear layer or one inside a module of
    ``modules_to_save`` (trained in full: BERT's ``dense`` also names ``bert.pooler.dense``), when
    ``modules_to_save`` names a module the model does not have, or when no targets are given for a model
    type without defaults (``"all-linear"`` skips the modules of ``modules_to_save``).
    Everything is checked before the model changes, and a call that fails leaves it as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, PLoRAConfig):
        raise TypeError(f"config must be a plora.PLoRAConfig, got {type(config).__name__}")
    if plora_layers(model):
        raise ValueError("model already holds PLoRA layers: inject once per model")
    if config.target_modules is None:
        config = dataclasses.replace(config, target_modules=default_target_modules(model))
    saved = extra_modules(model, config)  # a missing modules_to_save entry is refused before anything changes
    targets = _target_names(model, config, saved)
    with undo_injection_on_failure(model):
        layers = {
            name: PLoRALinear(
                model.get_submodule(name),
                config.r,
                config.scale_for(name),
                dropout=config.dropout,
                init=config.init,
                adapter_dtype=config.adapter_dtype,
            )
            for name in targets
        }
        for name, layer in layers.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
        extra = extra_modules(model, config)
        for name, param in model.named_parameters():
            adapter = name.rpartition(".")[2] in ("lora_a", "lora_b")
            param.requires_grad_(adapter or any(name.startswith(m + ".") for m in extra))
        model.plora_config = config
    return model


@contextmanager
def undo_injection_on_failure(model: nn.Module) -> Iterator[None]:
    """Run an injection into ``model`` (which holds no PLoRA layer yet) as one step: if the block raises,
    every ``PLoRALinear`` is replaced by its base again, each parameter gets back its ``requires_grad`` and
    ``plora_config`` its old value (or none), then the error propagates. The bases are never written to."""
    flags = [(param, param.requires_grad) for param in model.parameters()]
    missing = object()
    config = model.__dict__.get("plora_config", missing)
    try:
        yield
    except BaseException:
        for name, layer in plora_layers(model).items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.base_layer)
        for param, flag in flags:
            param.requires_grad_(flag)
        if config is missing:
            model.__dict__.pop("plora_config", None)
        else:
            model.__dict__["plora_config"] = config
        raise


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


def _target_names(model: nn.Module, config: PLoRAConfig, saved: list[str]) -> list[str]:
    """The modules to adapt; ``saved``: the modules trained in full (``extra_modules``), never adapted."""
    targets = config.target_modules

    def inside_saved(name: str) -> bool:
        return any(name == s or name.startswith(s + ".") for s in saved)

    if targets == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n, m in model.named_modules() if _base.is_adaptable(m) and m is not head and not inside_saved(n)]
    else:
        matched = [(n, m) for n, m in model.named_modules() if n and name_matches(n, targets)]
        wrong = [f"{n} ({type(m).__name__})" for n, m in matched if not _base.is_adaptable(m)]
        # A regex may sweep in containers; named targets must all be linear layers.
        if wrong and not isinstance(targets, str):
            raise ValueError(f"target_modules must name nn.Linear or Linear4bit modules, but these match: {wrong}")
        names = [n for n, m in matched if _base.is_adaptable(m)]
        clash = [n for n in names if inside_saved(n)]
        if clash:
            raise ValueError(
                f"target_modules={targets!r} match {clash}, inside modules_to_save {config.modules_to_save!r} (trained in "
                "full): name the targets more precisely (for example 'attention.output.dense') or drop the module from "
                "modules_to_save"
            )
    if not names:
        raise ValueError(f"no nn.Linear or Linear4bit module of the model matches target_modules={targets!r}")
    return names
