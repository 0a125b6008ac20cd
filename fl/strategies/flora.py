"""FLoRA: stack the clients' modules, merge the stack into the base, restart LoRA each round (Wang et al.; docs/fl.md)."""

from __future__ import annotations

import numpy as np
import torch

from .base import Adapter, ClientPlan, ClientUpdate, Factors, RoundResult, first_modules, stacked
from .merges import MergesIntoBase
from .registry import register


@register
class FLoRA(MergesIntoBase):
    """Each round every client starts new rank-``r_i`` modules of its own (``A`` Kaiming-uniform as LoRA,
    seeded by the round and the client, as the reference code draws a fresh PEFT adapter per client;
    ``B`` zero). The server stacks ``p_i A_i`` as rows and ``B_i`` as columns, so that
    ``B_g A_g = Σ p_i B_i A_i`` exactly, and merges that into the frozen base (``RoundResult.base_update``).

    Down traffic: a client receives every stack merged since it last took part (its copy of the base
    is that old), besides the head; its merge of them counts as client FLOPs.
    """

    name = "flora"
    not_a_sum = "it merges every client's own modules into the base: each product B_i A_i is released, not a sum"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fresh_round = -1

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        return tensors, {**meta, "fresh_round": self._fresh_round}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        self._fresh_round = meta["fresh_round"]

    def _fresh(self, rnd: int) -> None:
        """New modules for round ``rnd`` (see ``fresh_modules``)."""
        if self._fresh_round == rnd:
            return
        self.adapter = fresh_modules(self.adapter, fresh_seed(self.seed, rnd))
        self._fresh_round = rnd

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        self._fresh(rnd)
        download, flops, merged = self.missed_stacks(client)
        init = {"fresh_seed": fresh_seed(self.seed, rnd, client), "rank": rank, "base_updates": merged}
        adapter = self.client_adapter({}, init, self.adapter)
        idx = first_modules(rank, self.rank, next(iter(adapter.values())).a.device)
        return self.plan(client, adapter, {n: idx for n in adapter}, download, client_flops=flops, init=init)

    @classmethod
    def client_adapter(cls, download: dict[str, torch.Tensor], init: dict, template: Adapter) -> Adapter:
        """The round's fresh modules, regenerated from ``init``'s seed (they are not sent), first ``rank`` kept."""
        adapter = {}
        for name, (a, b) in fresh_modules(template, init["fresh_seed"]).items():
            a[init["rank"] :] = 0
            adapter[name] = Factors(a, b)
        return adapter

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        stack = {name: stacked(updates, weights, name) for name in self.adapter}
        self.stacks.append(stack)
        self.average_extra(updates, weights)
        self._fresh(rnd + 1)
        return RoundResult(base_update=stack)


def fresh_seed(seed: int, rnd: int, client: int | None = None) -> int:
    """The seed of round ``rnd``'s fresh modules in a run seeded ``seed``: a client's own, or (``client``
    None) the global adapter's (whose ``b`` is zero: it only fills the slot between rounds)."""
    if client is not None:
        return int(np.random.SeedSequence([seed, rnd, client, 1]).generate_state(1)[0])
    return seed * 100_003 + rnd


def fresh_modules(template: Adapter, seed: int) -> Adapter:
    """New factors shaped like ``template``: ``a ~ U(-1/√K, 1/√K)`` (LoRA's Kaiming-uniform), ``b = 0``,
    drawn layer by layer in order from one generator seeded ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, (a, b) in template.items():
        bound = a.shape[1] ** -0.5
        fresh = (torch.rand(a.shape, generator=generator, dtype=torch.float32) * 2 - 1) * bound
        out[name] = Factors(fresh.to(a.device, a.dtype), torch.zeros_like(b))
    return out
