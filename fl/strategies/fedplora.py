"""Fed-PLoRA: Select-N-Fold on the clients, per-module averaging on the server (DESIGN.md §1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import ClientPlan, ClientUpdate, Factors, RoundResult, Strategy

#: How a client may fold the modules it does not train (``plora.select_and_fold``).
FOLD_MODES = ("merge", "exact")


@dataclass
class FedPLoRAOptions:
    """``[methods.fedplora]``: ``fold_mode``, how a client folds the modules it does not train: "merge" into
    its base weight (the default), or "exact" (kept as frozen terms of the fused op, the base untouched)."""

    fold_mode: str = "merge"

    def __post_init__(self) -> None:
        if self.fold_mode not in FOLD_MODES:
            raise ValueError(f"fold_mode must be one of {FOLD_MODES}, got {self.fold_mode!r}")


def selection_seed(seed: int, rnd: int, client: int) -> int:
    """The seed of client ``client``'s module draw in round ``rnd`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1)[0])


def select_modules(rank: int, total: int, seed: int) -> torch.Tensor:
    """``rank`` distinct module indices drawn uniformly from ``[0, total)`` (sorted, int64)."""
    if not 1 <= rank <= total:
        raise ValueError(f"client rank must lie in [1, {total}], got {rank}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:rank].sort().values


class FedPLoRA(Strategy):
    """Every client receives all ``R`` modules, trains ``r_i`` of them drawn at random (one draw for all
    layers) and folds the rest; the server averages each module over the clients that trained it
    (weights by data size or uniform, renormalised per module); an untrained module keeps its value."""

    name = "fedplora"
    Options = FedPLoRAOptions

    @property
    def fold_mode(self) -> str:
        return self.options.fold_mode

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        first = next(iter(self.adapter.values()))
        idx = select_modules(rank, self.rank, selection_seed(self.seed, rnd, client)).to(first.a.device)
        adapter = {n: Factors(f.a.clone(), f.b.clone()) for n, f in self.adapter.items()}
        download = {f"{n}.{part}": t for n, f in self.adapter.items() for part, t in zip("ab", f)}
        return self.plan(client, adapter, {n: idx for n in adapter}, download)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        for name, (a, b) in self.adapter.items():
            mask = torch.zeros(len(updates), self.rank, dtype=torch.float64)
            for i, u in enumerate(updates):
                mask[i, u.trained[name].cpu()] = 1.0
            module_w = weights[:, None] * mask  # [C, R]
            total = module_w.sum(0)  # [R]
            seen = total > 0
            norm_w = torch.where(seen, module_w / total.clamp_min(1e-300), 0.0).to(torch.float32).to(a.device)
            new_a = sum(norm_w[i][:, None] * u.adapter[name].a.float() for i, u in enumerate(updates))
            new_b = sum(norm_w[i][None, :] * u.adapter[name].b.float() for i, u in enumerate(updates))
            keep = seen.to(a.device)
            self.adapter[name] = Factors(
                torch.where(keep[:, None], new_a, a.float()).to(a.dtype),
                torch.where(keep[None, :], new_b, b.float()).to(b.dtype),
            )
        self.average_extra(updates, weights)
        return RoundResult(info={"modules_trained": int(seen.sum())})
