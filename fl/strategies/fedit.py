"""FedIT: homogeneous LoRA FedAvg (docs/fl.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .base import Adapter, ClientPlan, ClientUpdate, Factors, RoundResult, Strategy, weighted_sum

if TYPE_CHECKING:
    from ..config import Config


@dataclass
class FedITOptions:
    """``[methods.fedit]``: ``client_rank``, the rank every client trains (in ``[1, R]``); unset (None) in a
    run config: the smallest client budget."""

    client_rank: int | None = None

    def __post_init__(self) -> None:
        rank = self.client_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"client_rank must be a positive integer or unset, got {rank!r}")


class FedIT(Strategy):
    """Every client trains the same rank ``client_rank`` (from a run config, the smallest budget by
    default, so that every client can afford it); ``A`` and ``B`` are averaged separately (data-size or
    uniform weights)."""

    name = "fedit"
    Options = FedITOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rank = self.options.client_rank
        if rank is None or rank > self.rank:
            raise ValueError(f"fedit client_rank must lie in [1, {self.rank}], got {rank}")

    @classmethod
    def from_config(cls, config: Config, adapter: Adapter, extra: dict[str, torch.Tensor], client_ranks: Sequence[int]) -> FedIT:
        """As ``Strategy.from_config``; ``client_rank`` unset: the smallest of ``client_ranks``."""
        options = dataclasses.replace(config.methods.fedit, client_rank=config.methods.fedit.client_rank or min(client_ranks))
        return cls(adapter, extra, config.federation.weighting, config.run.seed, **dataclasses.asdict(options))

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        return self.truncated_plan(client, self.options.client_rank)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        for name, (a, b) in self.adapter.items():
            self.adapter[name] = Factors(
                weighted_sum([u.adapter[name].a for u in updates], weights).to(a.dtype),
                weighted_sum([u.adapter[name].b for u in updates], weights).to(b.dtype),
            )
        self.average_extra(updates, weights)
        return RoundResult()
