"""The cells of a study on disk: each cell's state, and the check that a cell's recorded run is the one the
study now gives it."""

from __future__ import annotations

from ..config import Config, ConfigError, config_differences
from ..run.rundir import MAY_DIFFER
from ..storage import FileFormatError, finite_json, read_json, read_jsonl
from .config import Cell, StudyError


def cell_state(cell: Cell) -> str:
    """The cell's state: "finished" (its ``summary.json`` is written and every method ran all rounds),
    "started" (a run is in its directory: resume it) or "new" (no run yet)."""
    directory = cell.directory
    if not (directory / "config.json").is_file():
        return "new"
    if (directory / "summary.json").is_file():
        try:
            records = read_jsonl(directory / "metrics.jsonl")
        except FileFormatError:
            return "started"
        last = {}
        for r in records:
            last[r.get("method")] = max(last.get(r.get("method"), 0), r.get("round") or 0)
        if all(last.get(m, 0) >= cell.config.federation.rounds for m in cell.config.methods.names):
            return "finished"
    return "started"


def check_recorded(cells: list[Cell]) -> None:
    """``StudyError`` naming every cell whose run directory holds a run started under another config than
    the study gives it now (fields listed); results of two configs are never mixed."""
    problems = []
    for cell in cells:
        path = cell.directory / "config.json"
        if not path.is_file():
            continue
        try:
            saved = read_json(path)
            Config.from_dict({k: v for k, v in saved.items() if k != "command"})
        except (FileFormatError, ConfigError, KeyError, TypeError, AttributeError) as error:
            problems.append(f"cell {cell.name} ({cell.directory}): its config.json cannot be read ({error})")
            continue
        differ = config_differences(saved, finite_json(cell.config.to_dict()), (*MAY_DIFFER, "command"))
        if differ:
            changes = "; ".join(f"{k}: {was!r} (cell) -> {now!r} (study)" for k, was, now in differ[:6])
            problems.append(f"cell {cell.name} ({cell.directory}) was run under another config ({changes})")
    if problems:
        raise StudyError(
            "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more cells" if len(problems) > 4 else "") + ". "
            "The study changed after these cells ran and their results would be mixed with the new ones: restore the "
            "setting, give the changed setting a new name, or move the cells' directories away to run them anew"
        )
