"""Server strategies, one module per method, all on plain tensors (see ``base`` for the interface).

Each method's options are a dataclass, ``<Strategy>.Options``: keywords of its constructor and the table
``[methods.<name>]`` of a run config (``Strategy.for_run``). A method is one module that registers its
class (``registry.register``) and one import line below.
"""

from __future__ import annotations

from .base import Adapter, ClientPlan, ClientUpdate, Factors, MethodOptions, RoundResult, Strategy
from .registry import STRATEGIES, register, strategy_class

# isort: off
# Each method's module registers it; the order of these lines is the order of a run's table.
from .fedplora import FedPLoRA
from .fedit import FedIT
from .flora import FLoRA
from .hetlora import HetLoRA
from .flexlora import FlexLoRA
from .fedex import FedEx
from .rblora import RBLoRA

# isort: on


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
    "FedEx",
    "FedIT",
    "FedPLoRA",
    "FlexLoRA",
    "HetLoRA",
    "MethodOptions",
    "RBLoRA",
    "RoundResult",
    "Strategy",
    "build_strategy",
    "register",
    "strategy_class",
]
