"""A config as text and against another: TOML literals of its values, its fields as dotted keys, and the
fields where two configs differ (what a resume and a study check before they continue a run)."""

from __future__ import annotations

import dataclasses
import json
import math

from ..storage import finite_json
from .loading import Config
from .rules import ConfigError


def toml_literal(value) -> str:
    """The TOML literal of a value a config holds (what ``load_config``'s overrides parse back to it):
    strings as basic strings with every control character escaped, booleans lower-case, non-finite floats
    as ``nan``/``inf``, lists element-wise; ``ConfigError`` for anything else (a date, a table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return repr(value)
    raise ConfigError(f"{value!r} ({type(value).__name__}): not a value a run config holds")


def flatten(table: dict, prefix: str = "") -> dict:
    """Nested tables as dotted keys: ``{"a": {"b": 1}, "c.d": 2}`` -> ``{"a.b": 1, "c.d": 2}``."""
    out = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


#: What ``config_differences`` reports for a field one side lacks.
ABSENT = "<absent>"


def config_differences(recorded: dict, given: dict, ignore: tuple[str, ...] = ()) -> list[tuple[str, object, object]]:
    """``(field, recorded value, given value)`` for every dotted field where two config contents differ (as
    ``config.json`` holds them: ``Config.to_dict`` in standard JSON, plus any top-level key of its own such as
    ``command``), both read as ``Config.from_dict`` reads them, so that a field added since reads as what the
    older config ran; a content that does not read is compared as it is. Fields in ``ignore`` are skipped."""
    ours, theirs = flatten(_as_read(recorded)), flatten(_as_read(given))
    keys = sorted(set(ours) | set(theirs))
    return [
        (k, ours.get(k, ABSENT), theirs.get(k, ABSENT))
        for k in keys
        if k not in ignore and ours.get(k, ABSENT) != theirs.get(k, ABSENT)
    ]


def _as_read(content: dict) -> dict:
    """A config content with every field, as ``Config.from_dict`` reads it (unchanged when it cannot)."""
    sections = {f.name for f in dataclasses.fields(Config)}
    try:
        config = Config.from_dict({k: v for k, v in content.items() if k in sections})
    except (ConfigError, KeyError, TypeError, ValueError):
        return content
    return {**finite_json(config.to_dict()), **{k: v for k, v in content.items() if k not in sections}}
