"""A model's frozen bases changed for good: updates merged into them, and snapshots that restore them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from . import _base
from .inject import plora_layers
from .layer import PLoRALinear


def merge_into_base(model: nn.Module, updates: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``W += s · b @ a`` in the frozen base of each named PLoRA layer, for good.

    ``updates[name] = (a [r, K], b [N, r])`` for layer ``name`` (as in :func:`plora.plora_layers`; any
    ``r``), ``s`` the layer's scale (see :meth:`PLoRALinear.merge_into_base`). Every name, type, shape and
    layer state is checked, and every update moved to its layer's device, before any base changes. A
    merge that fails mid-way (a kernel error) is undone in the layers already merged: 4-bit bases from a
    packed snapshot taken just before their merge (bit-exact), float bases by subtracting the update
    again (within the rounding of one fold and unfold).
    """
    layers = _named(model, updates)
    for name, (a, b) in updates.items():
        try:
            layers[name]._check_merge(a, b)
        except (RuntimeError, TypeError, ValueError) as error:
            raise type(error)(f"layer {name}: {error}") from None
    moved = {}
    for name, (a, b) in updates.items():
        device = layers[name].lora_a.device
        moved[name] = (a.detach().to(device), b.detach().to(device))
    done = []
    try:
        for name, (a, b) in moved.items():
            layer = layers[name]
            saved = _base.snapshot(layer.base_layer) if layer.is_4bit else None
            try:
                _base.merge_into_base(layer.base_layer, a, b, layer.scale)
            except BaseException:
                if saved is not None:
                    _base.restore(layer.base_layer, saved)
                raise
            done.append((layer, a, b, saved))
    except BaseException:
        for layer, a, b, saved in reversed(done):
            if saved is not None:
                _base.restore(layer.base_layer, saved)
            else:
                _base.fold_into_base(layer.base_layer, a, b, list(range(a.shape[0])), layer.scale, unfold=True)
        raise


def snapshot_bases(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, object]:
    """Copies of the frozen base weights of the named PLoRA layers (all by default) for :func:`restore_bases`:
    float weights on the host, 4-bit weights as their packed codes and quantisation state."""
    layers = _named(model, plora_layers(model) if names is None else names)
    return {name: _base.snapshot(layer.base_layer) for name, layer in layers.items()}


def restore_bases(model: nn.Module, snapshot: Mapping[str, object]) -> None:
    """Write the base weights of :func:`snapshot_bases` back, bit-exactly.

    Every name is checked, and every snapshot against its base (shape and dtype), before any base changes.
    """
    layers = _named(model, snapshot)
    for name, saved in snapshot.items():
        try:
            _base.check_snapshot(layers[name].base_layer, saved)
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {name}: {error}") from None
    for name, saved in snapshot.items():
        _base.restore(layers[name].base_layer, saved)


def _named(model: nn.Module, names: Iterable[str]) -> dict[str, PLoRALinear]:
    """The PLoRA layers called ``names``; ``KeyError`` naming any the model does not have."""
    names, layers = list(names), plora_layers(model)
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise KeyError(f"no PLoRA layer named {unknown} in the model")
    return {name: layers[name] for name in names}
