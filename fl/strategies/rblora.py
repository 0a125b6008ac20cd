"""RB-LoRA: rank-partitioned averaging, each module over the clients whose rank reaches it (Ha et al.; docs/fl.md)."""

from __future__ import annotations

import torch

from .base import ClientPlan, ClientUpdate, RoundResult, Strategy
from .fedplora import module_means
from .registry import register


@register
class RBLoRA(Strategy):
    """A client of rank ``r_i`` receives the global adapter's first ``r_i`` modules and trains them (no
    folding, no random selection); the server averages module ``j`` (row ``j`` of ``A``, column ``j`` of ``B``,
    separately) over the round's clients whose rank reaches it, with data-size (or uniform) weights
    renormalised among them:

        θ_j ← Σ_{i: r_i > j} p_i θ_ij / Σ_{i: r_i > j} p_i

    RB-LoRA's rank-balanced weights ``γ_j^(i) = α_i β_j``, ``α_i = n_i / Σ_k n_k`` and
    ``β_j = Σ_k n_k / Σ_{k: r_k > j} n_k``, applied to the zero-padded factors. A module that no client of the
    round reaches keeps its value. Fed-PLoRA with ``selection = "first"`` and ``untrained = "drop"`` runs the
    same rounds."""

    name = "rblora"
    not_a_sum = None

    def sum_denominators(self, holders: torch.Tensor, clients: int) -> torch.Tensor:
        """Each module's holders: the clients whose rank reaches it."""
        return holders.double()

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        return self.truncated_plan(client, rank)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        self.adapter, trained = module_means(self.adapter, updates, weights, "holders")
        self.average_extra(updates, weights)
        return RoundResult(info={"modules_trained": trained})
