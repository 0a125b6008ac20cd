"""FedIT: homogeneous LoRA FedAvg (DESIGN.md §1 baselines)."""

from __future__ import annotations

from .base import ClientPlan, ClientUpdate, Factors, RoundResult, Strategy, weighted_sum


class FedIT(Strategy):
    """Every client trains the same rank ``client_rank`` (the smallest budget by default, so that every
    client can afford it); ``A`` and ``B`` are averaged separately (data-size or uniform weights)."""

    name = "fedit"

    def __init__(self, *args, client_rank: int, **kwargs):
        super().__init__(*args, **kwargs)
        if not 1 <= client_rank <= self.rank:
            raise ValueError(f"fedit client_rank must lie in [1, {self.rank}], got {client_rank}")
        self.client_rank = client_rank

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        return self.truncated_plan(client, self.client_rank)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        for name, (a, b) in self.adapter.items():
            self.adapter[name] = Factors(
                weighted_sum([u.adapter[name].a for u in updates], weights).to(a.dtype),
                weighted_sum([u.adapter[name].b for u in updates], weights).to(b.dtype),
            )
        self.average_extra(updates, weights)
        return RoundResult()
