"""The two noise measures of DESIGN.md §1, from factors (``strategies.lowrank``): nothing ``[N, K]`` is formed."""

from __future__ import annotations

from .strategies import Adapter
from .strategies.lowrank import relative_error


def initialisation_noise(client_start: Adapter, global_update: Adapter) -> float | None:
    """``‖ΔW_client_start − ΔW_global‖_F / ‖ΔW_global‖_F`` over all layers; None when the global update is zero
    and the client's start is not."""
    return relative_error(client_start, global_update)


def aggregation_noise(aggregated: Adapter, ideal: Adapter) -> float | None:
    """``‖ΔW_aggregated − Σ p_i ΔW_i‖_F / ‖Σ p_i ΔW_i‖_F`` over all layers, ``ideal`` the weighted sum as factors."""
    return relative_error(aggregated, ideal)
