"""PEFT interop: write a PLoRA model's adapter as a standard PEFT LoRA adapter, and read one back.

All ``R`` one-rank modules together are a rank-``R`` LoRA (``B A = Σ_j b_j a_jᵀ``) with the same
scale, so the conversion is exact: PEFT's ``lora_A.weight`` is ``lora_a`` and ``lora_B.weight`` is
``lora_b``. Weights are read and written as safetensors only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
import warnings
from collections import Counter
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .config import PLoRAConfig
from .inject import extra_modules, inject, plora_layers, undo_injection_on_failure
from .io import check_finite, load_adapter_state_dict, read_safetensors

_PREFIX = "base_model.model."
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


def export_peft(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the adapter of ``model`` to ``directory`` as a PEFT LoRA adapter of rank ``R``.

    ``peft.PeftModel.from_pretrained(base_model, directory)`` then computes what ``model`` computes
    (every module is exported, whatever its state; ``base_model`` is the unadapted model). Layers
    whose scale differs from the most common one get an ``alpha_pattern`` entry. Returns the directory.

    The files are written into a temporary sibling directory and moved in once both are complete: a call
    that fails leaves ``directory`` as it was (absent, or with its old files), never half-written.
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

    peft_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(layers),
        alpha_pattern={re.escape(n): a for n, a in alphas.items() if a != alpha},
        lora_dropout=config.dropout if config is not None else 0.0,
        modules_to_save=saved or None,
        bias="none",
        base_model_name_or_path=getattr(getattr(model, "config", None), "name_or_path", None) or None,
    )
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Both files are written into a fresh sibling directory first; a failure removes it and leaves
    # ``directory`` as it was. Then the new directory takes the place of ``directory`` (a rename), or,
    # when ``directory`` exists, each file replaces its old version (one rename each).
    staging = directory.with_name(f".{directory.name}.{uuid.uuid4().hex}.tmp")
    staging.mkdir()
    try:
        peft_config.save_pretrained(staging)
        save_file(state, os.fspath(staging / _WEIGHTS), metadata={"format": "pt"})
        if not directory.exists():
            staging.rename(directory)
            return directory
        for name in (_WEIGHTS, _CONFIG):
            os.replace(staging / name, directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def from_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load the PEFT LoRA adapter in ``directory`` into ``model`` as ``R`` one-rank modules per layer.

    A model without PLoRA layers is injected first (targets: exactly the layers the adapter holds;
    ``modules_to_save`` as in its config). rsLoRA scales are converted; DoRA, per-layer ranks, bias
    training and pickled (``.bin``) weights are refused. Returns ``model``.

    A call that fails leaves ``model`` as it was (a model injected by the call is given its layers back).
    Errors name the file: a missing or malformed ``adapter_config.json``, the config of another PEFT
    method than LoRA, an unreadable (e.g. truncated) safetensors file, non-finite values, weights that do
    not fit the config or the model.
    """
    directory = Path(directory)
    weights, config_path = directory / _WEIGHTS, directory / _CONFIG
    if not weights.is_file():
        found = "a pickled adapter_model.bin, which is never read" if (directory / "adapter_model.bin").exists() else "nothing"
        raise ValueError(f"directory must hold {_WEIGHTS}; {directory} holds {found}")
    peft_config = _read_lora_config(config_path)
    if getattr(peft_config, "use_dora", False):
        raise ValueError(f"{config_path}: DoRA adapters have a magnitude vector that PLoRA modules cannot represent")
    if peft_config.bias != "none":
        raise ValueError(f"{config_path}: adapters that train biases are not supported, got bias={peft_config.bias!r}")
    if any(r != peft_config.r for r in (peft_config.rank_pattern or {}).values()):
        raise ValueError(
            f"{config_path}: PLoRA needs one global rank, got r={peft_config.r} and rank_pattern={peft_config.rank_pattern}"
        )

    ours, theirs = (
        getattr(model.config, "_name_or_path", "") if hasattr(model, "config") else "",
        peft_config.base_model_name_or_path,
    )
    if ours and theirs and Path(ours).name != Path(theirs).name:
        warnings.warn(
            f"{config_path}: the adapter was trained on {theirs!r}, this model is {ours!r}; loaded as its layer names and "
            "shapes fit (a fine-tuned variant of the same base is a common use)",
            stacklevel=2,
        )
    rank = peft_config.r
    # PEFT scales by alpha / r (rsLoRA: alpha / sqrt(r)); PLoRA by alpha / R.
    factor = math.sqrt(rank) if peft_config.use_rslora else 1.0
    raw = read_safetensors(weights)
    check_finite(raw, where=os.fspath(weights))
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

    try:
        config = PLoRAConfig(
            r=rank,
            alpha=peft_config.lora_alpha * factor,
            target_modules="|".join(re.escape(n) for n in names),
            alpha_pattern={rf"(^|\.)(?:{p})$": a * factor for p, a in (peft_config.alpha_pattern or {}).items()},
            dropout=peft_config.lora_dropout,
            modules_to_save=list(peft_config.modules_to_save or []),
        )
    except (TypeError, ValueError) as error:
        raise type(error)(f"{config_path}: {error}") from None
    layers = plora_layers(model)
    if layers and sorted(layers) != names:
        raise ValueError(f"the adapter's layers {names} differ from the model's PLoRA layers {sorted(layers)}")
    if layers:
        wrong = [n for n, layer in layers.items() if layer.r != rank or not math.isclose(layer.scale, config.scale_for(n))]
        if wrong:
            raise ValueError(f"the model's PLoRA layers {wrong} differ from the adapter in rank or scale")
    # load_adapter_state_dict checks every key and shape before it writes. A model injected here and then
    # refused the state (e.g. weights of another rank than the config's r) gets its original layers back.
    try:
        with undo_injection_on_failure(model) if not layers else contextlib.nullcontext():
            if not layers:
                inject(model, config)
            load_adapter_state_dict(model, state, strict=True)
    except ValueError as error:
        raise ValueError(f"{directory}: {error}") from None
    return model


def _read_lora_config(path: Path):
    """The ``LoraConfig`` in ``path``; ``ValueError`` naming the file when it is missing, not JSON, or the
    config of another PEFT method (``peft_type`` other than ``"LORA"``)."""
    from peft import LoraConfig

    if not path.is_file():
        raise ValueError(f"{path} is missing: a PEFT adapter directory holds {_CONFIG} and {_WEIGHTS}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{path} holds a PEFT {peft_type} adapter config; only LORA adapters (peft_type 'LORA') are supported")
    try:
        config = LoraConfig.from_pretrained(os.fspath(path.parent))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a valid PEFT LoRA config: {error}") from error
    if not isinstance(config, LoraConfig):
        raise ValueError(f"{path} holds a {type(config).__name__}; only LORA adapters are supported")
    return config
