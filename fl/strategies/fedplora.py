"""Fed-PLoRA: Select-N-Fold on the clients, per-module averaging on the server (docs/fl.md, docs/collapse.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import (
    Adapter,
    ClientPlan,
    ClientUpdate,
    Factors,
    MethodOptions,
    RoundResult,
    Strategy,
    clients_where_held,
    first_modules,
    option,
)
from .registry import register

#: How a client may fold the modules it does not train (``plora.select_and_fold``).
FOLD_MODES = ("merge", "exact")

#: Over which clients the server averages a module (``FedPLoRAOptions.module_mean``).
MODULE_MEANS = ("holders", "clients")

#: Which modules a client trains (``FedPLoRAOptions.selection``).
SELECTIONS = ("random", "first")

#: What a client does with the modules it does not train (``FedPLoRAOptions.untrained``).
UNTRAINED = ("fold", "drop")


@dataclass
class FedPLoRAOptions(MethodOptions):
    """``[methods.fedplora]``.

    fold_mode: how a client folds the modules it does not train: "merge" into its base weight (the default),
    or "exact" (kept as frozen terms of the fused op, the base untouched).
    module_mean: over which of the round's clients a module is averaged. "holders" (the default, the paper's
    rule): only the clients that trained it, weights renormalised over them
    (``Σ_{i holds j} p_i θ_ij / Σ_{i holds j} p_i``), so that a module held by one client takes that client's
    factors whole (a client alone on many modules moves the model by up to ``1 / p_i`` times its share);
    "clients": all of them, a client that did not train the module counting with the value it received (the
    module's FedAvg, ``θ_j + Σ_{i holds j} p_i (θ_ij − θ_j)``: each client moves the model by its share ``p_i``
    of the round, as in ``Σ p_i ΔW_i``).

    Ablations (the defaults are the method): selection: which ``r_i`` modules a client trains, "random" (drawn
    per client and round) or "first" (modules ``0 … r_i − 1``, as a rank-``r_i`` LoRA); untrained: what it does
    with the others, "fold" them into its frozen base (it starts from the global model) or "drop" them (they
    are zero during its training and are not sent: it starts from its ``r_i`` modules alone, and downloads
    ``r_i (N + K)`` values per layer instead of ``R (N + K)``). The upload (the trained modules) and the
    server's mean are the same either way.
    """

    fold_mode: str = option("merge", f"one of {', '.join(FOLD_MODES)}", "how a client folds the modules it does not train")
    module_mean: str = option(
        "holders", f"one of {', '.join(MODULE_MEANS)}", "over which of the round's clients a module is averaged"
    )
    selection: str = option(
        "random", f"one of {', '.join(SELECTIONS)}", "which modules a client trains: drawn at random, or its first r_i"
    )
    untrained: str = option(
        "fold", f"one of {', '.join(UNTRAINED)}", "the modules a client does not train: folded into its base, or dropped"
    )

    def __post_init__(self) -> None:
        if self.fold_mode not in FOLD_MODES:
            raise ValueError(f"fold_mode must be one of {FOLD_MODES}, got {self.fold_mode!r}")
        if self.module_mean not in MODULE_MEANS:
            raise ValueError(f"module_mean must be one of {MODULE_MEANS}, got {self.module_mean!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.untrained not in UNTRAINED:
            raise ValueError(f"untrained must be one of {UNTRAINED}, got {self.untrained!r}")


def selection_seed(seed: int, rnd: int, client: int) -> int:
    """The seed of client ``client``'s module draw in round ``rnd`` of a run seeded ``seed``."""
    return int(np.random.SeedSequence([seed, rnd, client]).generate_state(1)[0])


def select_modules(rank: int, total: int, seed: int) -> torch.Tensor:
    """``rank`` distinct module indices drawn uniformly from ``[0, total)`` (sorted, int64)."""
    if not 1 <= rank <= total:
        raise ValueError(f"client rank must lie in [1, {total}], got {rank}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(total, generator=generator)[:rank].sort().values


@register
class FedPLoRA(Strategy):
    """Every client receives all ``R`` modules, trains ``r_i`` of them drawn at random (one draw for all
    layers) and folds the rest; the server averages each module (weights by data size or uniform) over the
    round's clients or over the clients that trained it (``module_mean``); an untrained module keeps its value."""

    name = "fedplora"
    Options = FedPLoRAOptions
    not_a_sum = None

    @property
    def fold_mode(self) -> str:
        return self.options.fold_mode

    def configure_client(self, rnd: int, client: int, rank: int) -> ClientPlan:
        device = next(iter(self.adapter.values())).a.device
        if self.options.selection == "random":
            idx = select_modules(rank, self.rank, selection_seed(self.seed, rnd, client)).to(device)
        else:
            idx = first_modules(rank, self.rank, device)
        trained = {n: idx for n in self.adapter}
        if self.options.untrained == "fold":
            adapter = {n: Factors(f.a.clone(), f.b.clone()) for n, f in self.adapter.items()}
            download = {f"{n}.{part}": t for n, f in self.adapter.items() for part, t in zip("ab", f)}
            return self.plan(client, adapter, trained, download)
        download = {}
        for n, (a, b) in self.adapter.items():
            download[f"{n}.a"], download[f"{n}.b"] = a[idx], b[:, idx]
        init = {"modules": idx.tolist()}
        return self.plan(client, self.client_adapter(download, init, self.adapter), trained, download, init=init)

    @classmethod
    def client_adapter(cls, download: dict[str, torch.Tensor], init: dict, template: Adapter) -> Adapter:
        """With ``untrained = "drop"`` (``init["modules"]``: the trained indices) the sent modules at those
        indices and zeros elsewhere; else all ``R`` modules as sent."""
        if "modules" not in init:
            return super().client_adapter(download, init, template)
        sent = super().client_adapter(download, {}, template)  # the sent modules first, in order
        idx = torch.tensor(init["modules"], dtype=torch.int64, device=next(iter(template.values())).a.device)
        adapter = {}
        for name, (a, b) in sent.items():
            placed_a, placed_b = torch.zeros_like(a), torch.zeros_like(b)
            placed_a[idx], placed_b[:, idx] = a[: len(idx)], b[:, : len(idx)]
            adapter[name] = Factors(placed_a, placed_b)
        return adapter

    def sum_denominators(self, holders: torch.Tensor, clients: int) -> torch.Tensor:
        """A module's holders (``module_mean = "holders"``), or the round's clients where it has any."""
        return holders.double() if self.options.module_mean == "holders" else clients_where_held(holders, clients)

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult:
        weights = self.client_weights(updates)
        self.adapter, trained = module_means(self.adapter, updates, weights, self.options.module_mean)
        self.average_extra(updates, weights)
        return RoundResult(info={"modules_trained": trained})


def module_means(adapter: Adapter, updates: list[ClientUpdate], weights: torch.Tensor, mean: str) -> tuple[Adapter, int]:
    """Each module ``j`` of every layer averaged separately (its row of ``a [R, K]`` and column of ``b [N, R]``),
    with the clients' ``weights [C]``: over the clients that trained it, weights renormalised among them
    (``mean = "holders"``), or over all of them, a client that did not train it counting with the value in
    ``adapter`` (``"clients"``); a module nobody trained keeps its value. Returns the new adapter and the number
    of modules trained in the last layer (every client trains the same indices in every layer)."""
    out = {}
    for name, (a, b) in adapter.items():
        rank = a.shape[0]
        mask = torch.zeros(len(updates), rank, dtype=torch.float64)
        for i, u in enumerate(updates):
            mask[i, u.trained[name].cpu()] = 1.0
        module_w = weights[:, None] * mask  # [C, R]: client i's weight in module j, 0 where it did not train j
        coverage = module_w.sum(0)  # [R]: the round's weight that trained module j
        seen = coverage > 0
        if mean == "holders":
            module_w = torch.where(seen, module_w / coverage.clamp_min(1e-300), 0.0)
            kept = (~seen).double()  # the old value stays only where no client trained the module
        else:
            # the weight that left module j as received (exactly 0 where every client trained it)
            kept = torch.where(mask.bool().all(0), 0.0, (1.0 - coverage).clamp_min(0.0))
        module_w = module_w.to(torch.float32).to(a.device)
        kept = kept.to(torch.float32).to(a.device)
        new_a = kept[:, None] * a.float() + sum(w[:, None] * u.adapter[name].a.float() for w, u in zip(module_w, updates))
        new_b = kept[None, :] * b.float() + sum(w[None, :] * u.adapter[name].b.float() for w, u in zip(module_w, updates))
        out[name] = Factors(new_a.to(a.dtype), new_b.to(b.dtype))
    return out, int(seen.sum())
