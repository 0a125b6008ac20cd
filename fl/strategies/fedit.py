"""FedIT: homogeneous LoRA FedAvg (docs/fl.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import (
    ClientPlan,
    ClientUpdate,
    Factors,
    MethodOptions,
    RoundResult,
    Strategy,
    clients_where_held,
    option,
    weighted_sum,
)
from .registry import register


@dataclass
class FedITOptions(MethodOptions):
    """``[methods.fedit]``: ``client_rank``, the rank every client trains (in ``[1, R]``); unset (None) in a
    run config: the smallest client budget."""

    client_rank: int | None = option(
        None, "an integer in [1, model.rank], or unset", "the rank every client trains; unset: the smallest client budget"
    )

    def __post_init__(self) -> None:
        rank = self.client_rank
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"client_rank must be a positive integer or unset, got {rank!r}")

    def check_run(self, global_rank: int) -> None:
        if self.client_rank is not None and self.client_rank > global_rank:
            raise ValueError(f"client_rank = {self.client_rank}: must lie in [1, model.rank = {global_rank}]")

    def for_clients(self, client_ranks: Sequence[int]) -> FedITOptions:
        """Unset ``client_rank``: the smallest client budget, so that every client can afford it."""
        return self if self.client_rank is not None else dataclasses.replace(self, client_rank=min(client_ranks))


@register
class FedIT(Strategy):
    """Every client trains the same rank ``client_rank`` (from a run config, the smallest budget by
    default, so that every client can afford it); ``A`` and ``B`` are averaged separately (data-size or
    uniform weights)."""

    name = "fedit"
    Options = FedITOptions
    not_a_sum = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        rank = self.options.client_rank
        if rank is None or rank > self.rank:
            raise ValueError(f"fedit client_rank must lie in [1, {self.rank}], got {rank}")

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        return self.truncated_plan(client, self.options.client_rank)

    def sum_denominators(self, holders: torch.Tensor, clients: int) -> torch.Tensor:
        """FedAvg: the round's clients for the ``client_rank`` modules every client trains."""
        return clients_where_held(holders, clients)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        for name, (a, b) in self.adapter.items():
            self.adapter[name] = Factors(
                weighted_sum([u.adapter[name].a for u in updates], weights).to(a.dtype),
                weighted_sum([u.adapter[name].b for u in updates], weights).to(b.dtype),
            )
        self.average_extra(updates, weights)
        return RoundResult()
