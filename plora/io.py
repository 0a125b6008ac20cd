"""Adapter state: the values of every module (and of the extra trainable modules), in memory and as safetensors."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import extra_modules, plora_layers


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the adapter state of ``model``.

    Keys: ``"<layer>.lora_a"`` ``[R, K]`` and ``"<layer>.lora_b"`` ``[N, R]`` for every PLoRA layer
    (the current values of all modules, whatever their state), plus the full parameter names of the
    modules in ``model.plora_config.modules_to_save``.
    """
    layers = plora_layers(model)
    if not layers:
        raise ValueError("model has no PLoRA layers: call plora.inject(model, config) first")
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora_a"], state[f"{name}.lora_b"] = layer.module_values()
    state.update({k: v.detach().clone() for k, v in _extra_parameters(model).items()})
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> tuple[list[str], list[str]]:
    """Copy ``state`` (as :func:`adapter_state_dict` returns it) into ``model``.

    Every key, shape and value is validated before anything is written, so a call that fails changes
    nothing. With ``strict`` a missing or unexpected key is an error; otherwise they are skipped. Shapes
    must always match, and values must be finite (a NaN or an infinity is a ``ValueError`` naming the
    tensor). Refused while a layer has modules folded into its base (unfold first). Returns
    ``(missing, unexpected)`` keys.
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of tensors, got {type(state).__name__}")
    layers = plora_layers(model)
    if not layers:
        raise ValueError("model has no PLoRA layers: call plora.inject(model, config) first")
    extra = _extra_parameters(model)
    expected = {f"{n}.{p}": getattr(layer, p).shape for n, layer in layers.items() for p in ("lora_a", "lora_b")}
    expected.update({k: v.shape for k, v in extra.items()})
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected), key=str)
    if strict and (missing or unexpected):
        raise ValueError(f"adapter state does not fit the model: missing keys {missing}, unexpected keys {unexpected}")
    for key in set(expected) & set(state):
        value = state[key]
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state[{key!r}] must be a torch.Tensor, got {type(value).__name__}")
        if value.shape != expected[key]:
            raise ValueError(f"state[{key!r}] must have shape {tuple(expected[key])}, got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"state[{key!r}] must be a floating-point tensor (module values), got {value.dtype}")
    check_finite({key: state[key] for key in expected if key in state})
    touched = {n: layer for n, layer in layers.items() if f"{n}.lora_a" in state or f"{n}.lora_b" in state}
    folded = [n for n, layer in touched.items() if layer.indices("folded")]
    if folded:
        raise RuntimeError(f"cannot load module values while modules are folded into the base (e.g. {folded[0]}): unfold first")
    for name, layer in touched.items():
        keys = (f"{name}.lora_a", f"{name}.lora_b")
        a, b = layer.module_values()
        layer.set_module_values(state.get(keys[0], a), state.get(keys[1], b))
    with torch.no_grad():
        for key, param in extra.items():
            if key in state:
                param.copy_(state[key])
    return missing, unexpected


def check_finite(tensors: dict[str, torch.Tensor], where: str = "state") -> None:
    """``ValueError`` naming the first tensor (sorted by name) that holds a NaN or an infinity.

    One host synchronisation per device, not one per tensor."""
    by_device: dict[torch.device, list[str]] = {}
    for key, value in tensors.items():
        if value.is_floating_point() or value.is_complex():
            by_device.setdefault(value.device, []).append(key)
    bad = []
    for keys in by_device.values():
        flags = torch.stack([torch.isfinite(tensors[k]).all() for k in keys]).tolist()
        bad += [k for k, ok in zip(keys, flags) if not ok]
    if bad:
        raise ValueError(f"{where}[{sorted(bad, key=str)[0]!r}] holds non-finite values (NaN or inf); {len(bad)} tensor(s) do")


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write :func:`adapter_state_dict` to a safetensors file (the config goes into its metadata).

    The file is written beside ``path`` under a temporary name and renamed over it once complete: a
    call that fails leaves no file, or the old one, never a truncated one.
    """
    state = {k: v.contiguous().cpu() for k, v in adapter_state_dict(model).items()}
    config = getattr(model, "plora_config", None)
    metadata = {"format": "pt", "plora_config": json.dumps(asdict(config), default=str)} if config else {"format": "pt"}
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(state, os.fspath(temporary), metadata=metadata)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_adapter(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> tuple[list[str], list[str]]:
    """Read a safetensors file written by :func:`save_adapter` into ``model``.

    A file that safetensors cannot read (truncated, not safetensors) is a ``ValueError`` naming it, as
    is a state that does not fit the model; either way the model is left as it was.
    """
    device = next(iter(plora_layers(model).values())).lora_a.device if plora_layers(model) else "cpu"
    state = read_safetensors(path, device=str(device))
    try:
        return load_adapter_state_dict(model, state, strict=strict)
    except ValueError as error:
        raise ValueError(f"{os.fspath(path)}: {error}") from None


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` whose errors name the file (``FileNotFoundError`` stays one)."""
    try:
        return load_file(os.fspath(path), device=device)
    except FileNotFoundError:
        raise
    except Exception as error:  # SafetensorError (truncated or not safetensors), OSError
        raise ValueError(f"cannot read the safetensors file {os.fspath(path)}: {error}") from error


def _extra_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    config = getattr(model, "plora_config", None)
    if config is None:
        return {}
    names = extra_modules(model, config)
    return {f"{n}.{p}": param for n in names for p, param in model.get_submodule(n).named_parameters()}
