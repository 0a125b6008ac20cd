"""HetLoRA: truncate, zero-pad, weight by update norm, optional rank self-pruning (Cho et al.; docs/fl.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .base import ClientPlan, ClientUpdate, Factors, MethodOptions, RoundResult, Strategy, option, weighted_sum
from .lowrank import gram_flops, squared_norm
from .registry import register


@dataclass
class HetLoRAOptions(MethodOptions):
    """``[methods.hetlora]``: ``prune_gamma`` in (0, 1) turns rank self-pruning on (unset, None: off), with
    ``prune_lambda`` (>= 0) the weight of the local regulariser on the tail modules that pruning would cut."""

    prune_gamma: float | None = option(None, "a number in (0, 1), or unset", "rank self-pruning keeps floor(gamma r); unset: off")
    prune_lambda: float = option(0.01, "a finite number >= 0", "the weight of the local regulariser on the tail modules")

    def __post_init__(self) -> None:
        gamma, weight = self.prune_gamma, self.prune_lambda
        if gamma is not None and (isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < 1):
            raise ValueError(f"prune_gamma must lie in (0, 1) or be unset, got {gamma!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
            raise ValueError(f"prune_lambda must be a finite number >= 0, got {weight!r}")


@register
class HetLoRA(Strategy):
    """A client of rank ``r_i`` receives the global adapter's first ``r_i`` modules; its return is
    zero-padded to ``R``; per layer, clients are weighted by ``‖B_i A_i‖_F`` (normalised; data-size or
    uniform weights when every norm is zero).

    Rank self-pruning (``prune_gamma`` = γ in (0, 1), off by default), as Cho et al. run it: a client of rank
    ``r`` adds ``λ Σ_layers ‖B_tail‖_F ‖A_tail‖_F`` to its local loss (``prune_lambda`` = λ; the tail: modules
    ``[max(1, ⌊γ r⌋), r)``), and one whose tail term ``Σ ‖B_tail‖_F ‖A_tail‖_F`` ends a round smaller than it
    ended its previous round drops to rank ``max(1, ⌊γ r⌋)`` for the rest of the run.
    """

    name = "hetlora"
    not_a_sum = "its weights are the clients' update norms ‖B_i A_i‖_F, which depend on their data"
    Options = HetLoRAOptions

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pruned_rank: dict[int, int] = {}
        self._tail_norm: dict[int, tuple[int, float]] = {}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        tails = {str(c): list(v) for c, v in self._tail_norm.items()}
        return tensors, {**meta, "pruned_rank": {str(c): r for c, r in self.pruned_rank.items()}, "tail_norm": tails}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        self.pruned_rank = {int(c): r for c, r in meta["pruned_rank"].items()}
        self._tail_norm = {int(c): (r, norm) for c, (r, norm) in meta["tail_norm"].items()}

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        r = min(rank, self.pruned_rank.get(client, rank))
        keep = self._kept(r)
        local = {"tail_penalty": [keep, r, self.options.prune_lambda]} if keep < r and self.options.prune_lambda else None
        return self.truncated_plan(client, r, local)

    @classmethod
    def local_penalty(cls, local: dict, layers: dict[str, nn.Module]) -> Callable[[], torch.Tensor] | None:
        """The rank regulariser when the plan sets ``local["tail_penalty"] = [start, stop, weight]``:
        ``weight · Σ_layers ‖B[:, start:stop]‖_F · ‖A[start:stop]‖_F``, the modules ``[start, stop)`` being
        the tail that self-pruning would cut."""
        if "tail_penalty" not in local:
            return None
        start, stop, weight = local["tail_penalty"]

        def penalty() -> torch.Tensor:
            return weight * sum(
                torch.linalg.vector_norm(layer.lora_b[:, start:stop]) * torch.linalg.vector_norm(layer.lora_a[start:stop])
                for layer in layers.values()
            )

        return penalty

    def _kept(self, rank: int) -> int:
        """The rank a client of rank ``rank`` would prune to (``rank`` itself when pruning is off)."""
        if self.options.prune_gamma is None:
            return rank
        return max(1, math.floor(self.options.prune_gamma * rank))

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        fallback = self.client_weights(updates)
        flops = 0.0
        for name, (a, b) in self.adapter.items():
            norms = torch.tensor([math.sqrt(squared_norm(u.adapter[name])) for u in updates], dtype=torch.float64)
            flops += sum(gram_flops(b.shape[0], a.shape[1], a.shape[0]) for _ in updates)
            weights = norms / norms.sum() if norms.sum() > 0 else fallback
            self.adapter[name] = Factors(
                weighted_sum([u.adapter[name].a for u in updates], weights).to(a.dtype),
                weighted_sum([u.adapter[name].b for u in updates], weights).to(b.dtype),
            )
        self.average_extra(updates, fallback)
        if self.options.prune_gamma is not None:
            self._self_prune(updates)
        return RoundResult(server_flops=flops, info={"pruned_ranks": dict(self.pruned_rank)})

    def _self_prune(self, updates: list[ClientUpdate]) -> None:
        for u in updates:
            r = len(next(iter(u.trained.values())))
            keep = self._kept(r)
            tail = sum(
                float(torch.linalg.vector_norm(f.b[:, keep:r]) * torch.linalg.vector_norm(f.a[keep:r]))
                for f in u.adapter.values()
            )
            previous = self._tail_norm.get(u.client)
            if previous is not None and previous[0] == r and tail < previous[1] and keep < r:
                self.pruned_rank[u.client] = keep
            self._tail_norm[u.client] = (r, tail)
