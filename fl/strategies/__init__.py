"""Server strategies, one module per method, all on plain tensors (see ``base`` for the interface).

Each method's options are a dataclass, ``<Strategy>.Options``: keywords of its constructor and the table
``[methods.<name>]`` of a run config (``Strategy.from_config``).
"""

from __future__ import annotations

from .base import Adapter, ClientPlan, ClientUpdate, Factors, RoundResult, Strategy
from .fedit import FedIT
from .fedplora import FedPLoRA
from .flexlora import FlexLoRA
from .flora import FLoRA
from .hetlora import HetLoRA

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedPLoRA, FedIT, FLoRA, HetLoRA, FlexLoRA)}


def strategy_class(name: str) -> type[Strategy]:
    """The strategy called ``name`` (fedplora, fedit, flora, hetlora, flexlora)."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(STRATEGIES)}") from None


def build_strategy(name: str, adapter: Adapter, extra: dict, weighting: str = "data", seed: int = 0, **options) -> Strategy:
    """The strategy ``name`` started from ``adapter``/``extra``; ``options`` are the method's own (the
    fields of its ``Options``: fedplora ``fold_mode``, fedit ``client_rank``, hetlora ``prune_gamma``)."""
    return strategy_class(name)(adapter, extra, weighting=weighting, seed=seed, **options)


__all__ = [
    "STRATEGIES",
    "Adapter",
    "ClientPlan",
    "ClientUpdate",
    "FLoRA",
    "Factors",
    "FedIT",
    "FedPLoRA",
    "FlexLoRA",
    "HetLoRA",
    "RoundResult",
    "Strategy",
    "build_strategy",
    "strategy_class",
]
