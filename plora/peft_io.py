"""PEFT interop: write a PLoRA model's adapter as a standard PEFT LoRA adapter, and read one back.

All ``R`` one-rank modules together are a rank-``R`` LoRA (``B A = Σ_j b_j a_jᵀ``) with the same
scale, so the conversion is exact: PEFT's ``lora_A.weight`` is ``lora_a`` and ``lora_B.weight`` is
``lora_b``. Weights are read and written as safetensors only.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import PLoRAConfig
from .inject import extra_modules, inject, plora_layers
from .io import load_adapter_state_dict

_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to ``directory`` as a PEFT LoRA adapter of rank ``R``.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then computes what ``model`` computes
    (every module is exported, whatever its state; ``base_model`` is the unadapted model). Layers
    whose scale differs from the most common one get an ``alpha_pattern`` entry. Returns the directory.
    """
    from peft import LoraConfig

    layers = plora_layers(model)
    if not layers:
        raise ValueError("model has no PLoRA layers: call plora.inject(model, config) first")
    ranks = {layer.r for layer in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"a PEFT LoRA adapter needs one rank for every layer, got ranks {sorted(ranks)}")
    (rank,) = ranks
    alphas = {name: layer.scale * rank for name, layer in layers.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = getattr(model, "plora_config", None)
    saved = extra_modules(model, config) if config is not None else []

    state = {}
    for name, layer in layers.items():
        a, b = layer.module_values()
        state[f"{_PREFIX}{name}.lora_A.weight"] = a.contiguous().cpu()
        state[f"{_PREFIX}{name}.lora_B.weight"] = b.contiguous().cpu()
    for name in saved:
        for param_name, param in model.get_submodule(name).named_parameters():
            state[f"{_PREFIX}{name}.{param_name}"] = param.detach().contiguous().cpu()

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(layers),
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
        lora_dropout=config.dropout if config is not None else 0.0,
        modules_to_save=saved or None,
        bias="none",
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None,
    ).save_pretrained(directory)
    save_file(state, directory / _WEIGHTS, metadata={"format": "pt"})
    return directory


def from_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the PEFT LoRA adapter in ``directory`` into ``model`` as ``R`` one-rank modules per layer.

    A model without PLoRA layers is injected first (targets: exactly the layers the adapter holds;
    ``modules_to_save`` as in its config). rsLoRA scales are converted; DoRA, per-layer ranks, bias
    training and pickled (``.bin``) weights are refused. Returns ``model``.
    """
    from peft import LoraConfig

    directory = Path(directory)
    weights = directory / _WEIGHTS
    if not weights.is_file():
        found = "a pickled adapter_model.bin, which is never read" if (directory / "adapter_model.bin").exists() else "nothing"
        raise ValueError(f"directory must hold {_WEIGHTS}; {directory} holds {found}")
    peft_config = LoraConfig.from_pretrained(directory)
    if getattr(peft_config, "use_dora", False):
        raise ValueError("DoRA adapters have a magnitude vector that PLoRA modules cannot represent")
    if peft_config.bias != "none":
        raise ValueError(f"adapters that train biases are not supported, got bias={peft_config.bias!r}")
    if any(r != peft_config.r for r in (peft_config.rank_pattern or {}).values()):
        raise ValueError(f"PLoRA needs one global rank, got r={peft_config.r} and rank_pattern={peft_config.rank_pattern}")

    rank = peft_config.r
    # PEFT scales by alpha / r (rsLoRA: alpha / sqrt(r)); PLoRA by alpha / R.
    factor = math.sqrt(rank) if peft_config.use_rslora else 1.0
    raw = load_file(os.fspath(weights))
    state, names = {}, []
    for key, value in raw.items():
        name = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
        for peft_suffix, ours in ((".lora_A.weight", ".lora_a"), (".lora_B.weight", ".lora_b")):
            if name.endswith(peft_suffix):
                name = name[: -len(peft_suffix)]
                names.append(name)
                name += ours
                break
        state[name] = value
    names = sorted(set(names))
    if not names:
        raise ValueError(f"{weights} holds no lora_A / lora_B weights")

    config = PLoRAConfig(
        r=rank,
        alpha=peft_config.lora_alpha * factor,
        target_modules="|".join(re.escape(n) for n in names),
        alpha_pattern={rf"(^|\.)(?:{p})$": a * factor for p, a in (peft_config.alpha_pattern or {}).items()},
        dropout=peft_config.lora_dropout,
        modules_to_save=list(peft_config.modules_to_save or []),
    )
    layers = plora_layers(model)
    if not layers:
        inject(model, config)
    elif sorted(layers) != names:
        raise ValueError(f"the adapter's layers {names} differ from the model's PLoRA layers {sorted(layers)}")
    else:
        wrong = [n for n, layer in layers.items() if layer.r != rank or not math.isclose(layer.scale, config.scale_for(n))]
        if wrong:
            raise ValueError(f"the model's PLoRA layers {wrong} differ from the adapter in rank or scale")
    with torch.no_grad():
        load_adapter_state_dict(model, state, strict=True)
    return model
