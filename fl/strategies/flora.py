"""FLoRA: stack the clients' modules, merge the stack into the base, restart LoRA each round (Wang et al.; docs/fl.md)."""

from __future__ import annotations

import numpy as np
import torch

from .base import Adapter, ClientPlan, ClientUpdate, Factors, RoundResult, Strategy, first_modules, stacked
from .lowrank import product_flops
from .registry import register


@register
class FLoRA(Strategy):
    """Each round every client starts new rank-``r_i`` modules of its own (``A`` Kaiming-uniform as LoRA,
    seeded by the round and the client, as the reference code draws a fresh PEFT adapter per client;
    ``B`` zero). The server stacks ``p_i A_i`` as rows and ``B_i`` as columns, so that
    ``B_g A_g = Σ p_i B_i A_i`` exactly, and merges that into the frozen base (``RoundResult.base_update``).

    Down traffic: a client receives every stack merged since it last took part (its copy of the base
    is that old), besides the head; its merge of them counts as client FLOPs.
    """

    name = "flora"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stacks: list[Adapter] = []  # one per round, in order
        self.last_round: dict[int, int] = {}  # client -> number of stacks it has merged
        self._fresh_round = -1

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        for t, stack in enumerate(self.stacks):
            tensors.update({f"stack{t}.{n}.{p}": v for n, f in stack.items() for p, v in zip("ab", f)})
        meta = {
            **meta,
            "stacks": len(self.stacks),
            "last_round": {str(c): k for c, k in self.last_round.items()},
            "fresh_round": self._fresh_round,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        device = next(iter(self.adapter.values())).a.device
        self.stacks = [
            {n: Factors(tensors[f"stack{t}.{n}.a"].to(device), tensors[f"stack{t}.{n}.b"].to(device)) for n in self.adapter}
            for t in range(meta["stacks"])
        ]
        self.last_round = {int(c): k for c, k in meta["last_round"].items()}
        self._fresh_round = meta["fresh_round"]

    def merged_updates(self) -> list[Adapter]:
        return list(self.stacks)

    def _fresh(self, rnd: int) -> None:
        """New modules for round ``rnd`` (see ``fresh_modules``)."""
        if self._fresh_round == rnd:
            return
        self.adapter = fresh_modules(self.adapter, fresh_seed(self.seed, rnd))
        self._fresh_round = rnd

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        self._fresh(rnd)
        first = self.last_round.get(client, 0)
        self.last_round[client] = len(self.stacks)
        download, flops = {}, 0.0
        for t, stack in enumerate(self.stacks[first:], start=first):
            for name, (a, b) in stack.items():
                download[f"stack{t}.{name}.a"], download[f"stack{t}.{name}.b"] = a, b
                flops += product_flops(b.shape[0], a.shape[1], a.shape[0])
        init = {"fresh_seed": fresh_seed(self.seed, rnd, client), "rank": rank, "base_updates": len(self.stacks)}
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

    @classmethod
    def client_base_updates(cls, download: dict[str, torch.Tensor], init: dict) -> dict[int, Adapter]:
        """The stacks sent (``stack<t>.<layer>.a|b``), by their round index ``t``."""
        parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for key, tensor in download.items():
            if key.startswith("stack"):
                index, rest = key[len("stack") :].split(".", 1)
                layer, part = rest.rsplit(".", 1)
                parts.setdefault(int(index), {}).setdefault(layer, {})[part] = tensor
        return {t: {n: Factors(f["a"], f["b"]) for n, f in layers.items()} for t, layers in parts.items()}

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
