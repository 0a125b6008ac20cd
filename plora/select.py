"""Select-N-Fold on a whole model: keep chosen modules trainable, fold or freeze the rest, undo."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .inject import plora_layers
from .layer import MODES


def select_and_fold(
    model: nn.Module,
    indices: Iterable[int] | Mapping[str, Iterable[int]],
    mode: str | None = None,
    *,
    pristine: bool = False,
) -> None:
    """Keep ``indices`` trainable in every PLoRA layer and fold (or freeze) the other modules.

    Args:
        model: a model with PLoRA layers (see :func:`plora.inject`), none currently selected.
        indices: one set of module indices for all layers, or a mapping from every layer name (as in
            :func:`plora.plora_layers`) to its own set.
        mode: ``"merge"`` folds the other modules into the base weight (the fused op then runs only
            the selected ones); ``"exact"`` keeps them as frozen terms of the fused op (the base is
            untouched). ``None``: ``"merge"`` for float bases, ``"exact"`` for 4-bit bases (a 4-bit
            fold keeps only ~30% of a trained delta: see :meth:`PLoRALinear.select_and_fold`).
        pristine: keep a host copy of each float base folded into, so that :func:`unfold` restores
            it bit-exactly (merge/unfold in bf16 otherwise drifts by rounding).

    Everything is validated before any layer changes, and a call that fails changes nothing: when a
    layer fails mid-way (a fold kernel's error), the layers already done are unfolded again (bit-exactly
    with ``pristine=True``, in ``"exact"`` mode and on 4-bit bases; a float base folded without a snapshot
    comes back within the rounding of one fold and unfold, as :func:`unfold` gives it). Indices must be
    integers: a float or a bool (or a tensor of them) is a ``TypeError``, never truncated to a module.
    Build the optimizer after this call: only the selected modules require gradients.
    """
    layers = plora_layers(model)
    if not layers:
        raise ValueError("model has no PLoRA layers: call plora.inject(model, config) first")
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES} or None, got {mode!r}")
    if isinstance(indices, Mapping):
        unknown = sorted(set(indices) - set(layers), key=str)
        missing = sorted(set(layers) - set(indices))
        if unknown or missing:
            raise ValueError(
                f"indices must map every PLoRA layer name to its module indices; unknown: {unknown}, missing: {missing}"
            )
        per_layer = {name: indices[name] for name in layers}
    else:
        if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
            raise TypeError(f"indices must be an iterable of module indices or a mapping per layer, got {indices!r}")
        shared = indices if isinstance(indices, torch.Tensor) else list(indices)
        per_layer = {name: shared for name in layers}
    busy = [name for name, layer in layers.items() if layer.is_selected]
    if busy:
        raise RuntimeError(f"select_and_fold was already called on {len(busy)} layer(s) (e.g. {busy[0]}): unfold first")
    checked = {}
    for name, layer in layers.items():
        try:
            # The checked lists go on to the layers: an iterator among the values is read once, here.
            checked[name] = layer._check_selection(per_layer[name])
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {name}: {error}") from None
    done = []
    try:
        for name, layer in layers.items():
            layer.select_and_fold(checked[name], mode, pristine=pristine)
            done.append(layer)
    except BaseException:
        for layer in reversed(done):
            layer.unfold()
        raise


def unfold(model: nn.Module) -> None:
    """Undo :func:`select_and_fold` in every PLoRA layer: trained modules written back, bases restored.

    Layers that are not selected are skipped, so a call that fails mid-way (a kernel error) leaves every
    layer either unfolded or still selected with its values intact, and calling it again finishes the job.
    """
    for layer in plora_layers(model).values():
        layer.unfold()
