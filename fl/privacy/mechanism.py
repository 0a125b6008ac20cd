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

In this process ``aggregate_sums`` does it all: ``round_sums`` (each ``private_delta``, summed) then
``apply_sums`` (step, noise, divisors). Under secure aggregation each client computes its ``private_delta``
itself, the protocol sums them, and the server checks what a sum shows (``check_secure_sums``) before
``apply_sums``.
"""

from __future__ import annotations

import math
import secrets
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


def noise_generator(seed: int | None, rnd: int) -> torch.Generator:
    """The CPU generator of round ``rnd``'s noise: in a run seeded ``seed``, from that seed (reproducible,
    resume-safe); with ``seed`` None, seeded from 64 bits of the operating system's entropy (secret)."""
    if seed is None:
        return torch.Generator().manual_seed(secrets.randbits(64))
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


def clipped(delta: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled to L2 norm at most ``clip`` (all its tensors as one vector), and its norm before."""
    norm = math.sqrt(sum(float(t.square().sum()) for t in delta.values()))
    if norm <= clip:
        return delta, norm
    return {k: t * (clip / norm) for k, t in delta.items()}, norm


def unchanged(plan: ClientPlan) -> ClientUpdate:
    """The update of a client that returned its plan as it received it."""
    adapter = {n: Factors(f.a.clone(), f.b.clone()) for n, f in plan.adapter.items()}
    extra = {n: t.clone() for n, t in plan.extra.items()}
    return ClientUpdate(plan.client, 1, adapter, {n: i.clone() for n, i in plan.trained.items()}, extra)


def sum_names(plan: ClientPlan) -> list[str]:
    """The names of a round's sum-form tensors, in the order they travel (``client_delta``'s keys, sorted)."""
    return sorted([f"{n}.{part}" for n in plan.adapter for part in "ab"] + [f"extra.{n}" for n in plan.extra])


def private_delta(plan: ClientPlan, update: ClientUpdate | None, counted: dict[str, torch.Tensor], clip: float):
    """``(clip(δ), ‖δ‖)``: what client ``plan.client`` adds to the round's sums (``client_delta`` clipped to
    ``clip``) and its norm before the clip, computed by the server from an update it sees or by the client
    itself under secure aggregation."""
    return clipped(client_delta(plan, update, counted), clip)


def round_sums(
    plans: Sequence[ClientPlan], updates: Sequence[ClientUpdate], counted: dict[str, torch.Tensor], clip: float
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """``(Σ_i clip(δ_i), norms)`` over every planned client (one without an update adds zeros): the sums a
    secure-aggregation protocol computes, and the norms before the clip of the deltas of ``updates``."""
    by_client = {u.client: u for u in updates}
    if set(by_client) - {p.client for p in plans}:
        raise ValueError(f"updates of unplanned clients {sorted(set(by_client) - {p.client for p in plans})}")
    sums, norms = None, []
    for plan in plans:
        delta, norm = private_delta(plan, by_client.get(plan.client), counted, clip)
        if plan.client in by_client:
            norms.append(norm)
        sums = delta if sums is None else {k: sums[k] + t for k, t in delta.items()}
    return sums, norms


def check_sum_form(strategy: Strategy) -> None:
    """``ValueError`` unless ``strategy``'s server step is a sum of deltas under uniform weights."""
    if strategy.not_a_sum is not None:
        raise ValueError(f"{strategy.name} cannot aggregate in sum form: {strategy.not_a_sum}")
    if strategy.weighting != "uniform":
        raise ValueError(f"sum form needs uniform weights; {strategy.name} weights by {strategy.weighting!r}")


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
    ``{"dp_clipped": clients whose delta was scaled down, "dp_norm_median": the median norm of the updates'
    deltas before the clip (None without one), "dp_modules_kept": modules over all layers with a holder but
    fewer than min_holders}``. ``ValueError`` for a method that is not a sum or weights by data."""
    check_sum_form(strategy)
    counted = {name: d > 0 for name, d in denominators(strategy, plans, params.min_holders).items()}
    sums, norms = round_sums(plans, updates, counted, params.clip)
    result, info = apply_sums(strategy, rnd, plans, sums, params, generator)
    clipped_count = sum(norm > params.clip for norm in norms)
    return result, {"dp_clipped": clipped_count, "dp_norm_median": float(np.median(norms)) if norms else None, **info}


def apply_sums(
    strategy: Strategy,
    rnd: int,
    plans: Sequence[ClientPlan],
    sums: dict[str, torch.Tensor],
    params: PrivacyParams,
    generator: torch.Generator | None = None,
) -> tuple[RoundResult, dict]:
    """The round's step from its ``sums`` (``round_sums``, or what a secure aggregation returned): the
    method's own step on the plans, then each sum noised once and divided by its denominator. Returns the
    step's ``RoundResult`` and ``{"dp_modules_kept": …}``."""
    check_sum_form(strategy)
    holders = holder_counts(plans)
    denoms = denominators(strategy, plans, params.min_holders)
    result = strategy.aggregate(rnd, [unchanged(p) for p in plans])
    std = params.noise_multiplier * params.clip if params.noise_multiplier else 0.0

    def noised(total: torch.Tensor) -> torch.Tensor:
        if std == 0:
            return total
        return total + std * torch.randn(total.shape, generator=generator).to(total.device)

    for name, (a, b) in strategy.adapter.items():
        d = denoms[name].to(torch.float32).to(a.device)
        inv = torch.where(d > 0, 1 / d.clamp_min(1), 0.0)
        new_a = a.float() + inv[:, None] * noised(sums[f"{name}.a"].to(a.device))
        new_b = b.float() + inv[None, :] * noised(sums[f"{name}.b"].to(b.device))
        strategy.adapter[name] = Factors(new_a.to(a.dtype), new_b.to(b.dtype))
    for name, value in strategy.extra.items():
        strategy.extra[name] = (value.float() + noised(sums[f"extra.{name}"].to(value.device)) / len(plans)).to(value.dtype)
    kept = sum(int(((h > 0) & (h < params.min_holders)).sum()) for h in holders.values())
    return result, {"dp_modules_kept": kept}


def check_secure_sums(
    plans: Sequence[ClientPlan],
    contributors: Sequence[int],
    sums: dict[str, torch.Tensor],
    counted: dict[str, torch.Tensor],
    clip: float,
    slack: float,
) -> None:
    """What a server can check of sums it cannot take apart (secure aggregation): the expected tensors and
    shapes, finite values, zero (within ``slack`` per element) outside the counted modules that the
    ``contributors`` (indices into ``plans``) were planned to train, and an L2 norm of at most
    ``len(contributors) · clip`` (plus ``slack`` per element). Raises ``ValueError`` naming the fault."""
    expected = {}
    for i in contributors:
        plan = plans[i]
        for name, factors in plan.adapter.items():
            mask = torch.zeros(factors.a.shape[0], dtype=torch.bool)
            mask[plan.trained[name].cpu()] = True
            mask &= counted[name].cpu()
            prior = expected.get(f"{name}.a", torch.zeros_like(mask))
            expected[f"{name}.a"] = expected[f"{name}.b"] = prior | mask
    template = plans[0]
    shapes = {f"{n}.{p}": tuple(t.shape) for n, f in template.adapter.items() for p, t in zip("ab", f)}
    shapes.update({f"extra.{n}": tuple(t.shape) for n, t in template.extra.items()})
    if set(sums) != set(shapes):
        raise ValueError(f"the secure sum carries tensors {sorted(sums)}; expected {sorted(shapes)}")
    squares, elements = 0.0, 0
    for key, shape in shapes.items():
        total = sums[key].float().cpu()
        if tuple(total.shape) != shape:
            raise ValueError(f"the secure sum's {key} has shape {tuple(total.shape)}; expected {shape}")
        if not torch.isfinite(total).all():
            raise ValueError(f"the secure sum's {key} is not finite")
        if not key.startswith("extra."):
            per_module = total.abs().amax(1) if key.endswith(".a") else total.abs().amax(0)  # [R]
            stray = (per_module > slack) & ~expected[key]
            if stray.any():
                raise ValueError(
                    f"the secure sum changes {key} in modules {stray.nonzero().flatten().tolist()}, "
                    "which no contributing client was planned to train"
                )
        squares += float(total.double().square().sum())
        elements += total.numel()
    bound = len(contributors) * clip + slack * math.sqrt(elements)
    if math.sqrt(squares) > bound:
        raise ValueError(
            f"the secure sum's norm {math.sqrt(squares):.4g} exceeds {len(contributors)} clients x clip {clip:g} "
            f"(+ quantisation slack): some client did not clip its update"
        )
