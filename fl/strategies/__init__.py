"""Server strategies, one module per method, all on plain tensors (see ``base`` for the interface)."""

from __future__ import annotations

from .base import Adapter, ClientPlan, ClientUpdate, Factors, RoundResult, Strategy
from .fedit import FedIT
from .fedplora import FedPLoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedPLoRA, FedIT, FLoRA, HetLoRA, FlexLoRA)}


def build_strategy(name: str, adapter: Adapter, extra: dict, weighting: str = "data", seed: int = 0, **options) -> Strategy:
    """The strategy ``name`` (fedplora, fedit, flora, hetlora, flexlora) started from ``adapter``/``extra``;
    ``options`` are the method's own (fedit: ``client_rank``; hetlora: ``prune_gamma``)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(STRATEGIES)}") from None
    return cls(adapter, extra, weighting=weighting, seed=seed, **options)


__all__ = ["STRATEGIES", "Adapter", "ClientPlan", "ClientUpdate", "Factors", "RoundResult", "Strategy", "build_strategy"]
