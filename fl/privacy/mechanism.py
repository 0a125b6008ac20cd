"""Client-level differential privacy of a round (DP-FedAvg), on the server, in sum form.

A method whose server step is a sum of the clients' deltas under uniform weights (``Strategy.not_a_sum`` is
None) states by what it divides each module's sum (``Strategy.sum_denominators``). The round is then

    θ_j ← step(plans)_j + (Σ_i m_ij clip(δ_i)_j + N(0, (z C)² I)) / d_j          (d_j > 0)

for every module ``j`` of every layer (and the extra tensors, ``d = n``): ``step(plans)`` is the method's own
step on the round's plans returned unchanged (what needs no client data), ``δ_i`` client ``i``'s change from
its plan (its trained modules and extra tensors) clipped as a whole to L2 norm ``C``, ``m_ij`` the 0/1
indicator that its plan trains module ``j``, ``d_j`` the method's denominator (holders or clients). The
denominators and indicators come from the plans, which the server draws without reading any data, and a
planned client whose update was dropped or rejected counts with ``δ_i = 0``: the sums are all a
secure-aggregation protocol would have to compute. A module planned for fewer than ``min_holders`` clients is
left out of the sums (its ``d_j`` is 0, it keeps its value).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..strategies import ClientPlan, ClientUpdate, Factors, RoundResult, Strategy

#: The seed stream of a round's privacy noise (``noise_generator``).
NOISE_STREAM = 7


@dataclass(frozen=True)
class PrivacyParams:
    """``clip``: the L2 bound ``C`` of a client's whole delta (inf: none); ``noise_multiplier``: ``z``, noise of
    standard deviation ``z · C`` on every sum (0: none); ``min_holders``: the fewest planned trainers a module
    needs to enter the sums."""

    clip: float
    noise_multiplier: float
    min_holders: int = 1


def noise_generator(seed: int, rnd: int) -> torch.Generator:
    """The CPU generator of round ``rnd``'s noise in a run seeded ``seed`` (reproducible, resume-safe)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rnd, NOISE_STREAM]).generate_state(1)[0]))


def holder_counts(plans: Sequence[ClientPlan]) -> dict[str, torch.Tensor]:
    """Per layer, ``[R]``: how many of ``plans`` train each module."""
    counts = {}
    for name, (a, _) in plans[0].adapter.items():
        count = torch.zeros(a.shape[0], dtype=torch.float64)
        for plan in plans:
            count[plan.trained[name].cpu()] += 1
        counts[name] = count
    return counts


def denominators(strategy: Strategy, plans: Sequence[ClientPlan], min_holders: int) -> dict[str, torch.Tensor]:
    """Per layer, ``[R]``: the strategy's ``sum_denominators`` for the round's ``plans``, 0 where a module has
    fewer than ``min_holders`` holders."""
    out = {}
    for name, holders in holder_counts(plans).items():
        out[name] = torch.where(holders >= min_holders, strategy.sum_denominators(holders, len(plans)), 0.0)
    return out


def client_delta(plan: ClientPlan, update: ClientUpdate | None, counted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Client ``plan.client``'s change from its plan, zero-filled to the global shapes: per layer ``{name}.a``
    ``[R, K]`` and ``{name}.b`` ``[N, R]`` nonzero only in the modules it trained that are ``counted`` (per layer a
    ``[R]`` bool), and ``extra.{name}``; all zero for a client without ``update`` (fp32)."""
    delta = {}
    for name, (a, b) in plan.adapter.items():
        mask = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
        mask[plan.trained[name]] = True
        mask &= counted[name].to(a.device)
        da, db = torch.zeros_like(a, dtype=torch.float32), torch.zeros_like(b, dtype=torch.float32)
        if update is not None:
            new_a, new_b = update.adapter[name]
            da[mask] = new_a[mask].float() - a[mask].float()
            db[:, mask] = new_b[:, mask].float() - b[:, mask].float()
        delta[f"{name}.a"], delta[f"{name}.b"] = da, db
    for name, before in plan.extra.items():
        delta[f"extra.{name}"] = (
            update.extra[name].float() - before.float() if update is not None else torch.zeros_like(before, dtype=torch.float32)
        )
    return delta


def clipped(delta: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], bool]:
    """``delta`` scaled to L2 norm at most ``clip`` (all its tensors as one vector), and whether it was scaled."""
    norm = math.sqrt(sum(float(t.square().sum()) for t in delta.values()))
    if norm <= clip:
        return delta, False
    return {k: t * (clip / norm) for k, t in delta.items()}, True


def unchanged(plan: ClientPlan) -> ClientUpdate:
    """The update of a client that returned its plan as it received it."""
    adapter = {n: Factors(f.a.clone(), f.b.clone()) for n, f in plan.adapter.items()}
    extra = {n: t.clone() for n, t in plan.extra.items()}
    return ClientUpdate(plan.client, 1, adapter, {n: i.clone() for n, i in plan.trained.items()}, extra)


def aggregate_sums(
    strategy: Strategy,
    rnd: int,
    plans: Sequence[ClientPlan],
    updates: Sequence[ClientUpdate],
    params: PrivacyParams,
    generator: torch.Generator | None = None,
) -> tuple[RoundResult, dict]:
    """The round's step in sum form (module docstring) over the round's ``plans`` (every sampled client) and
    the accepted ``updates`` (matched to plans by client; a plan without one counts as unchanged); noise drawn
    from ``generator`` (needed when ``params.noise_multiplier > 0``). Returns the step's ``RoundResult`` and
    ``{"dp_clipped": clients whose delta was scaled down, "dp_modules_kept": modules over all layers with a
    holder but fewer than min_holders}``. ``ValueError`` for a method that is not a sum or weights by data."""
    if strategy.not_a_sum is not None:
        raise ValueError(f"{strategy.name} cannot aggregate in sum form: {strategy.not_a_sum}")
    if strategy.weighting != "uniform":
        raise ValueError(f"sum form needs uniform weights; {strategy.name} weights by {strategy.weighting!r}")
    by_client = {u.client: u for u in updates}
    if set(by_client) - {p.client for p in plans}:
        raise ValueError(f"updates of unplanned clients {sorted(set(by_client) - {p.client for p in plans})}")
    holders = holder_counts(plans)
    denoms = denominators(strategy, plans, params.min_holders)
    counted = {name: d > 0 for name, d in denoms.items()}
    sums, scaled = None, 0
    for plan in plans:
        delta, was_scaled = clipped(client_delta(plan, by_client.get(plan.client), counted), params.clip)
        scaled += was_scaled
        sums = delta if sums is None else {k: sums[k] + t for k, t in delta.items()}
    result = strategy.aggregate(rnd, [unchanged(p) for p in plans])
    std = params.noise_multiplier * params.clip if params.noise_multiplier else 0.0

    def noised(total: torch.Tensor) -> torch.Tensor:
        if std == 0:
            return total
        return total + std * torch.randn(total.shape, generator=generator).to(total.device)

    for name, (a, b) in strategy.adapter.items():
        d = denoms[name].to(torch.float32).to(a.device)
        inv = torch.where(d > 0, 1 / d.clamp_min(1), 0.0)
        new_a = a.float() + inv[:, None] * noised(sums[f"{name}.a"])
        new_b = b.float() + inv[None, :] * noised(sums[f"{name}.b"])
        strategy.adapter[name] = Factors(new_a.to(a.dtype), new_b.to(b.dtype))
    for name, value in strategy.extra.items():
        strategy.extra[name] = (value.float() + noised(sums[f"extra.{name}"]) / len(plans)).to(value.dtype)
    kept = sum(int(((h > 0) & (h < params.min_holders)).sum()) for h in holders.values())
    return result, {"dp_clipped": scaled, "dp_modules_kept": kept}
