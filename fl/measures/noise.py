"""The noise measures of a round, initialisation and aggregation (docs/runs.md), from factors
(``strategies.lowrank``): nothing ``[N, K]`` is formed, and layers are measured one at a time. Aggregation
noise is measured against two ideals: every client's whole update weighted (``clients_ideal``), and each
module's product averaged over the clients that trained it (``module_ideal``)."""

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
    strategy: Strategy, base_update: Adapter | None, updates: list[ClientUpdate], weights: list[float], ideal=None
) -> float | None:
    """The aggregation noise of a round that ``strategy`` has just aggregated: its global update (plus the
    round's ``base_update`` merged into the base, FLoRA's and FedEx-LoRA's) against ``ideal(name, updates,
    weights)`` per layer, one layer at a time; by default ``Σ p_i ΔW_i`` of the ``updates`` with ``weights``
    ``p_i`` (``module_ideal``: each module averaged over the clients that trained it)."""
    base_update = base_update or {}
    ideal = ideal or clients_ideal

    def layers():
        for name in strategy.adapter:
            result = strategy.global_factors(name)
            if name in base_update:
                result = concat([(1.0, result), (1.0, base_update[name])])
            yield result, ideal(name, updates, weights)

    return aggregation_noise(layers())


def clients_ideal(name: str, updates: list[ClientUpdate], weights: list[float]) -> Factors:
    """``Σ p_i ΔW_i`` of layer ``name``: every client's whole update (its untrained modules as it received
    them), weighted."""
    return merged([(w, u.adapter[name]) for w, u in zip(weights, updates)])


def module_ideal(name: str, updates: list[ClientUpdate], weights: list[float]) -> Factors:
    """``Σ_j Σ_{i ∈ H_j} p_i b_ij a_ijᵀ / Σ_{i ∈ H_j} p_i`` of layer ``name``: each module ``j``'s product
    averaged over the clients ``H_j`` that trained it (a module nobody trained: over every client, as
    received). The ideal of a per-module mean, against which only the mean of factors in place of the mean of
    products is noise."""
    rank = next(iter(updates)).adapter[name].a.shape[0]
    terms = []
    for j in range(rank):
        holders = [(w, u) for w, u in zip(weights, updates) if bool((u.trained[name] == j).any())]
        holders = holders or list(zip(weights, updates))
        total = sum(w for w, _ in holders)
        for w, u in holders:
            a, b = u.adapter[name]
            terms.append((w / total, Factors(a[j : j + 1], b[:, j : j + 1])))
    return merged(terms)
