"""The work a launch plan asks of a GPU, counted by the launchers themselves.

Each Triton launcher states, beside its launch, the floating-point operations its kernel executes (padding
to the rank bucket included) and the HBM bytes it must move at least (each operand read once, each output
written once; re-reads of tiles are assumed to hit L2). Nothing is recorded unless a ``counting()`` block is
active, so the launchers pay one global read per call. A roofline bound of a plan is then the sum over its
launches of ``max(flops / peak, bytes / bandwidth)`` (``bench/static_profile.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses


@dataclasses.dataclass(frozen=True)
class Cost:
    """One kernel launch: ``flops`` executed, HBM ``bytes`` moved, under ``name``."""

    name: str
    flops: float
    bytes: float


_RECORDS: list[list[Cost]] = []


def record(name: str, flops: float, bytes_: float) -> None:
    """Count one launch of ``name`` (inside every active ``counting()`` block; else nothing happens)."""
    for log in _RECORDS:
        log.append(Cost(name, float(flops), float(bytes_)))


@contextlib.contextmanager
def counting():
    """``with counting() as launches``: ``launches`` lists the ``Cost`` of every launch made in the block."""
    log: list[Cost] = []
    _RECORDS.append(log)
    try:
        yield log
    finally:
        _RECORDS.remove(log)
