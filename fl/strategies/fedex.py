"""FedEx-LoRA for mixed ranks: average A and B, fold the residual into the base (Singhal et al.; docs/fl.md)."""

from __future__ import annotations

import torch

from .base import ClientPlan, ClientUpdate, Factors, RoundResult, weighted_sum
from .lowrank import merged
from .merges import MergesIntoBase
from .registry import register


@register
class FedEx(MergesIntoBase):
    """Exact aggregation: a client of rank ``r_i`` receives the global adapter's first ``r_i`` modules and
    trains them (the others zero, as a rank-``r_i`` LoRA); the server averages ``A`` and ``B`` separately over
    the zero-padded returns (data-size or uniform weights ``p_i``), ``Ā = Σ p_i A_i``, ``B̄ = Σ p_i B_i``, and
    merges the residual

        E = Σ p_i B_i A_i − B̄ Ā

    into the frozen base for good (``RoundResult.base_update``), so that the model after the round is
    ``W0 + s (E + B̄ Ā) = W0 + s Σ p_i B_i A_i`` exactly. ``E`` stays factored (``lowrank.merged``: each
    client's nonzero modules with coefficient ``p_i``, the new global modules with ``−1``; a module equal in
    several terms entered once with the summed coefficient), rank at most ``Σ r_i + R``.

    Down traffic: a client receives its ``r_i`` modules and every residual merged since it last took part
    (its copy of the base is that old), besides the head; its merge of them counts as client FLOPs.
    """

    name = "fedex"
    not_a_sum = "its residual Σ p_i B_i A_i − B̄ Ā (products) is not bounded by clipping the factor deltas"

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        plan = self.truncated_plan(client, rank)
        download, flops, merged_so_far = self.missed_stacks(client)
        plan.download.update(download)
        plan.client_flops = flops
        plan.init = {"base_updates": merged_so_far}
        return plan

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        residual = {}
        for name, (a, b) in self.adapter.items():
            mean = Factors(
                weighted_sum([u.adapter[name].a for u in updates], weights).to(a.dtype),
                weighted_sum([u.adapter[name].b for u in updates], weights).to(b.dtype),
            )
            terms = [(w, u.adapter[name]) for w, u in zip(weights.tolist(), updates)]
            residual[name] = nonempty(merged([*terms, (-1.0, mean)]))
            self.adapter[name] = mean
        self.stacks.append(residual)
        self.average_extra(updates, weights)
        return RoundResult(base_update=residual)


def nonempty(stack: Factors) -> Factors:
    """``stack``, or where it has no module (every term zero) one zero module ``(a [1, K], b [N, 1])`` standing
    for the zero residual, so that every layer of every base update has factors to send and merge."""
    if stack.a.shape[0]:
        return stack
    return Factors(torch.zeros(1, stack.a.shape[1]), torch.zeros(stack.b.shape[0], 1))
