"""Checks on a client's update before the server aggregates it: a bad client is rejected, not averaged.

``validate_update`` checks the tensors against the plan; ``check_claims`` what a client says about itself
(who it is, how much data it holds, how it trained) against what the server knows.
"""

from __future__ import annotations

import math

import torch

from ..strategies import ClientPlan, ClientUpdate, Factors


class RejectedUpdate(ValueError):
    """A client update that failed validation; the message is the reason that goes into the log."""


def validate_update(plan: ClientPlan, update: ClientUpdate, norm_bound: float | None) -> None:
    """Raise ``RejectedUpdate`` unless ``update`` answers ``plan``: the same layers and extra tensors, the
    same shapes and dtypes, the planned modules trained and the others untouched, finite values, and
    a norm of the change from the plan (all trained factors and extras together) of at most ``norm_bound``."""
    _same_keys("layers", plan.adapter, update.adapter)
    _same_keys("extra tensors", plan.extra, update.extra)
    _same_keys("trained sets", plan.trained, update.trained)
    squared = 0.0
    for name, start in plan.adapter.items():
        if not torch.equal(update.trained[name].cpu(), plan.trained[name].cpu()):
            raise RejectedUpdate(
                f"layer {name}: trained modules {update.trained[name].tolist()}, planned {plan.trained[name].tolist()}"
            )
        for part, before, after in zip("ab", start, update.adapter[name]):
            _same_layout(f"{name}.{part}", before, after)
            _finite(f"{name}.{part}", after)
        idx = plan.trained[name].to(start.a.device)
        frozen = torch.ones(start.a.shape[0], dtype=torch.bool, device=start.a.device)
        frozen[idx] = False
        a, b = update.adapter[name]
        if not (torch.equal(a[frozen], start.a[frozen]) and torch.equal(b[:, frozen], start.b[:, frozen])):
            raise RejectedUpdate(f"layer {name}: modules outside the planned set changed")
        squared += float((a.float() - start.a.float()).square().sum() + (b.float() - start.b.float()).square().sum())
    for name, before in plan.extra.items():
        after = update.extra[name]
        _same_layout(f"extra {name}", before, after)
        _finite(f"extra {name}", after)
        squared += float((after.float() - before.float()).square().sum())
    norm = math.sqrt(squared)
    if norm_bound is not None and not norm <= norm_bound:
        raise RejectedUpdate(f"update norm {norm:.4g} exceeds the bound {norm_bound:.4g}")


def check_claims(plan: ClientPlan, update: ClientUpdate, stats, num_examples: int, steps: int) -> None:
    """Raise ``RejectedUpdate`` unless ``update`` and its training ``stats`` (``TrainStats``) say what the
    server knows of the planned client: the update names that client, claims its data size ``num_examples``
    (the server's record of the client's partition, the client's weight in data-size averaging), and the
    client took ``steps`` local steps with a finite mean loss (the loss the round's record averages).
    ``validate_update`` checks the trained module indices (hence the rank) against the plan."""
    if update.client != plan.client:
        raise RejectedUpdate(f"the update names client {update.client!r}; it was planned for client {plan.client}")
    claimed = update.num_examples
    if isinstance(claimed, bool) or not isinstance(claimed, int) or claimed != num_examples:
        raise RejectedUpdate(f"claims {claimed!r} examples; client {plan.client} holds {num_examples}")
    if isinstance(stats.steps, bool) or not isinstance(stats.steps, int) or stats.steps != steps:
        raise RejectedUpdate(f"claims {stats.steps!r} local steps; the plan is {steps}")
    if isinstance(stats.loss, bool) or not isinstance(stats.loss, (int, float)) or not math.isfinite(stats.loss):
        raise RejectedUpdate(f"claims a training loss of {stats.loss!r}; expected a finite number")
    if isinstance(stats.tokens, bool) or not isinstance(stats.tokens, int) or stats.tokens < 0:
        raise RejectedUpdate(f"claims {stats.tokens!r} tokens trained on; expected an integer >= 0")


def update_from_upload(plan: ClientPlan, num_examples: int, sent: dict[str, torch.Tensor]) -> ClientUpdate:
    """The ``ClientUpdate`` a remote client's upload (``ClientUpdate.upload``) stands for: its trained rows
    of ``a`` and columns of ``b`` put back into the plan's factors, the other modules as planned.

    Raises ``RejectedUpdate`` for a tensor missing, unexpected, or of another shape or dtype than the
    plan asks, and for a data size below 1. ``validate_update`` checks the rest.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise RejectedUpdate(f"num_examples must be a positive integer, got {num_examples!r}")
    expected = {}
    for name, (a, b) in plan.adapter.items():
        rank = len(plan.trained[name])
        expected[f"{name}.a"] = a.new_empty(rank, a.shape[1])
        expected[f"{name}.b"] = b.new_empty(b.shape[0], rank)
    expected.update({f"extra.{n}": t for n, t in plan.extra.items()})
    _same_keys("uploaded tensors", expected, sent)
    for key, like in expected.items():
        _same_layout(key, like, sent[key])
    adapter = {}
    for name, (a, b) in plan.adapter.items():
        idx = plan.trained[name].to(a.device)
        new_a, new_b = a.clone(), b.clone()
        new_a[idx] = sent[f"{name}.a"].to(a.device)
        new_b[:, idx] = sent[f"{name}.b"].to(b.device)
        adapter[name] = Factors(new_a, new_b)
    extra = {n: sent[f"extra.{n}"].to(t.device) for n, t in plan.extra.items()}
    return ClientUpdate(plan.client, num_examples, adapter, {n: i.clone() for n, i in plan.trained.items()}, extra)


def _same_keys(what: str, expected: dict, got: dict) -> None:
    if set(got) != set(expected):
        extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
        raise RejectedUpdate(f"{what}: unexpected {extra}, missing {missing}")


def _same_layout(name: str, expected: torch.Tensor, got: torch.Tensor) -> None:
    if got.shape != expected.shape or got.dtype != expected.dtype:
        raise RejectedUpdate(f"{name}: got {tuple(got.shape)} {got.dtype}, expected {tuple(expected.shape)} {expected.dtype}")


def _finite(name: str, tensor: torch.Tensor) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise RejectedUpdate(f"{name}: non-finite values ({bad})")
