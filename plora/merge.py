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
    ``r``), ``s`` the layer's scale (see :meth:`PLoRALinear.merge_into_base`). Every name, shape and
    layer state is checked before any base changes.
    """
    layers = _named(model, updates)
    for name, (a, b) in updates.items():
        try:
            layers[name]._check_merge(a, b)
        except (RuntimeError, ValueError) as error:
            raise type(error)(f"layer {name}: {error}") from None
    for name, (a, b) in updates.items():
        layers[name].merge_into_base(a, b)


def snapshot_bases(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, object]:
    """Copies of the frozen base weights of the named PLoRA layers (all by default) for :func:`restore_bases`:
    float weights on the host, 4-bit weights as their packed codes and quantisation state."""
    layers = _named(model, plora_layers(model) if names is None else names)
    return {name: _base.snapshot(layer.base_layer) for name, layer in layers.items()}


def restore_bases(model: nn.Module, snapshot: Mapping[str, object]) -> None:
    """Write the base weights of :func:`snapshot_bases` back, bit-exactly."""
    layers = _named(model, snapshot)
    for name, saved in snapshot.items():
        _base.restore(layers[name].base_layer, saved)


def _named(model: nn.Module, names: Iterable[str]) -> dict[str, PLoRALinear]:
    """The PLoRA layers called ``names``; ``KeyError`` naming any the model does not have."""
    names, layers = list(names), plora_layers(model)
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise KeyError(f"no PLoRA layer named {unknown} in the model")
    return {name: layers[name] for name in names}
