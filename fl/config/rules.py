"""The rules a config field obeys: each ``Check`` keeps a value (an int made a float where a float is expected)
or refuses it, and says what is allowed; ``setting`` puts a field's default, rule and help in one place."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection
from dataclasses import dataclass


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the field, its value and what is allowed."""


@dataclass(frozen=True)
class Check:
    """A field's rule: ``test(value)`` is the value to keep (an int made a float where a float is expected)
    or raises ``ValueError``; ``allowed`` says what is allowed, for the message; ``number``: a float field."""

    test: Callable
    allowed: str
    number: bool = False


def setting(default, rule: Check, help: str):
    """A section's field with its ``rule`` and ``help`` beside it (``dataclasses.field`` metadata); a list
    default is copied for every config."""
    metadata = {"rule": rule, "help": help}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(low: int, high: int | None = None, optional: bool = False) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not _is_int(value) or value < low or (high is not None and value > high):
            raise ValueError
        return value

    allowed = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
    return Check(test, allowed + (", or unset" if optional else ""))


def number(
    low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False, optional: bool = False, inf: bool = False
) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not (_is_int(value) or isinstance(value, float)) or math.isnan(value) or (math.isinf(value) and not inf):
            raise ValueError
        value = float(value)
        if value < low or value > high or (low_open and value == low) or (high_open and value == high):
            raise ValueError
        return value

    closed = not high_open and (high < math.inf or inf)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if closed else ')'}"
    allowed = f"a number in {interval}" + (", or unset" if optional else "")
    return Check(test, allowed, number=True)


def choice(options: Collection[str], optional: bool = False) -> Check:
    options = tuple(options)

    def test(value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or value not in options:
            raise ValueError
        return value

    return Check(test, f"one of {', '.join(options)}" + (", or unset" if optional else ""))


def boolean() -> Check:
    def test(value):
        if not isinstance(value, bool):
            raise ValueError
        return value

    return Check(test, "true or false")


def text(optional: bool = False) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value or "\0" in value:
            raise ValueError
        return value

    return Check(test, "a non-empty string" + (", or unset" if optional else ""))


def is_plain_name(name: str) -> bool:
    """A file or directory name that stays in its directory: not empty, not ``.``/``..``, no separator."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and name.strip() == name


def plain_name() -> Check:
    def test(value):
        if not isinstance(value, str) or not is_plain_name(value):
            raise ValueError
        return value

    return Check(test, "a plain directory name (not empty, not '.' or '..', no '/', '\\' or NUL)")


def strings(optional: bool = False, empty: bool = True) -> Check:
    def test(value):
        if value is None and optional:
            return None
        if not isinstance(value, list) or not (empty or value) or not all(isinstance(v, str) and v for v in value):
            raise ValueError
        return value

    allowed = ("a list" if empty else "a non-empty list") + " of non-empty strings" + (", or unset" if optional else "")
    return Check(test, allowed)


def integers(low: int) -> Check:
    def test(value):
        if not isinstance(value, list) or not value or not all(_is_int(v) and v >= low for v in value):
            raise ValueError
        return value

    return Check(test, f"a non-empty list of integers >= {low}")


def distinct_names(options: Collection[str], what: str, empty: bool = False, unset: str | None = None) -> Check:
    """A list of distinct names from ``options`` (``what`` they are, for the message); ``empty``: an empty list
    allowed; ``unset``: None allowed, meaning that (for the message)."""
    options = tuple(options)

    def test(value):
        if value is None and unset is not None:
            return None
        if not isinstance(value, list) or not (empty or value) or len(set(value)) != len(value):
            raise ValueError
        if not all(isinstance(v, str) and v in options for v in value):
            raise ValueError
        return value

    listed = "a list" if empty else "a non-empty list"
    return Check(test, f"{listed} of distinct {what} from {', '.join(options)}" + (f", or unset ({unset})" if unset else ""))
