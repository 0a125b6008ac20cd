"""The methods by name: each strategy's module registers its class (``@register``), and
``fl.strategies`` imports every module, so that a new method is one file and one import line."""

from __future__ import annotations

from .base import Strategy

#: Every method by its name (``Strategy.name``), in the order registered.
STRATEGIES: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Add ``cls`` to ``STRATEGIES`` under ``cls.name`` (a class decorator)."""
    if not cls.name or cls.name in STRATEGIES:
        raise ValueError(f"strategy {cls.__name__}: its name {cls.name!r} is empty or taken")
    STRATEGIES[cls.name] = cls
    return cls


def strategy_class(name: str) -> type[Strategy]:
    """The strategy called ``name``; ``KeyError`` naming the known ones."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; choose one of {', '.join(STRATEGIES)}") from None
