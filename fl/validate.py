"""Checks on a client's update before the server aggregates it: a bad client is rejected, not averaged."""

from __future__ import annotations

import math

import torch

from .strategies import ClientPlan, ClientUpdate


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
            raise RejectedUpdate(f"layer {name}: trained modules {update.trained[name].tolist()}, planned {plan.trained[name].tolist()}")
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
