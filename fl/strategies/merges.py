"""Methods that merge updates into the frozen base for good (FLoRA's stacks, FedEx-LoRA's residuals).

The server keeps every base update in order. The simulator's shared model merges each as it is made; a
remote client keeps those it has received and, in a round, downloads the ones merged since it last took
part (``stack<t>.<layer>.a|b`` in the plan's download, so that traffic counts them) and merges them before
it trains. A resumed run replays them all onto a fresh base (``merged_updates``).
"""

from __future__ import annotations

import torch

from .base import Adapter, Factors, Strategy
from .lowrank import product_flops


class MergesIntoBase(Strategy):
    """A strategy whose rounds add base updates ``stacks`` (per layer ``Factors(a [r, K], b [N, r])``,
    standing for ``W += s · b @ a``), and which remembers how many of them each client has received."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stacks: list[Adapter] = []  # one per round, in order
        self.last_round: dict[int, int] = {}  # client -> number of stacks it has merged

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = super().state()
        for t, stack in enumerate(self.stacks):
            tensors.update({f"stack{t}.{n}.{p}": v for n, f in stack.items() for p, v in zip("ab", f)})
        meta = {**meta, "stacks": len(self.stacks), "last_round": {str(c): k for c, k in self.last_round.items()}}
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        super().load_state(tensors, meta)
        device = next(iter(self.adapter.values())).a.device
        self.stacks = [
            {n: Factors(tensors[f"stack{t}.{n}.a"].to(device), tensors[f"stack{t}.{n}.b"].to(device)) for n in self.adapter}
            for t in range(meta["stacks"])
        ]
        self.last_round = {int(c): k for c, k in meta["last_round"].items()}

    def merged_updates(self) -> list[Adapter]:
        return list(self.stacks)

    def missed_stacks(self, client: int) -> tuple[dict[str, torch.Tensor], float, int]:
        """What ``client`` downloads this round: ``(download, merge FLOPs, stacks merged so far)``; the
        download holds every stack merged since it last took part (its copy of the base is that old), and
        the client counts as up to date from here on."""
        first = self.last_round.get(client, 0)
        self.last_round[client] = len(self.stacks)
        download, flops = {}, 0.0
        for t, stack in enumerate(self.stacks[first:], start=first):
            for name, (a, b) in stack.items():
                download[f"stack{t}.{name}.a"], download[f"stack{t}.{name}.b"] = a, b
                flops += product_flops(b.shape[0], a.shape[1], a.shape[0])
        return download, flops, len(self.stacks)

    @classmethod
    def client_base_updates(cls, download: dict[str, torch.Tensor], init: dict) -> dict[int, Adapter]:
        """The stacks sent (``stack<t>.<layer>.a|b``), by their index ``t``."""
        parts: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        for key, tensor in download.items():
            if key.startswith("stack"):
                index, rest = key[len("stack") :].split(".", 1)
                layer, part = rest.rsplit(".", 1)
                parts.setdefault(int(index), {}).setdefault(layer, {})[part] = tensor
        return {t: {n: Factors(f["a"], f["b"]) for n, f in layers.items()} for t, layers in parts.items()}
