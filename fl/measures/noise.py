"""The two noise measures of a round, initialisation and aggregation (docs/runs.md), from factors
(``strategies.lowrank``): nothing ``[N, K]`` is formed, and layers are measured one at a time."""

from __future__ import annotations

from collections.abc import Iterable

from ..strategies import Adapter, ClientUpdate, Factors, Strategy
from ..strategies.lowrank import concat, merged, relative_error


def initialisation_noise(layers: Iterable[tuple[Factors, Factors]]) -> float | None:
    """``‖ΔW_client_start − ΔW_global‖_F / ‖ΔW_global‖_F`` over all layers, from ``(client start, global)``
    pairs per layer; None when the global update is zero and the client's start is not."""
    return relative_error(layers)


def aggregation_noise(layers: Iterable[tuple[Factors, Factors]]) -> float | None:
    """``‖ΔW_aggregated − Σ p_i ΔW_i‖_F / ‖Σ p_i ΔW_i‖_F`` over all layers, from ``(aggregated, ideal)`` pairs
    per layer, the ideal weighted sum as factors."""
    return relative_error(layers)


def round_aggregation_noise(
    strategy: Strategy, base_update: Adapter | None, updates: list[ClientUpdate], weights: list[float]
) -> float | None:
    """The aggregation noise of a round that ``strategy`` has just aggregated: its global update (plus the
    round's ``base_update`` merged into the base, FLoRA's) against ``Σ p_i ΔW_i`` of the ``updates`` with
    ``weights`` ``p_i``, one layer at a time."""
    base_update = base_update or {}

    def layers():
        for name in strategy.adapter:
            result = strategy.global_factors(name)
            if name in base_update:
                result = concat([(1.0, result), (1.0, base_update[name])])
            yield result, merged([(w, u.adapter[name]) for w, u in zip(weights, updates)])

    return aggregation_noise(layers())
