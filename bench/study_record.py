"""A finished study as a benchmark record: ``bench/results/<name>-<device>.json`` from its directory.

Copies the study's ``summary.json``, ``results.jsonl`` rows and ``report.md`` with the command, the commit, the
versions and the wall time of every cell, and counts, per setting and method, the cells whose final metric is
at the majority class (within ``--majority-margin`` of the ``majority`` reference row of the same cell).

    python -m bench.study_record runs/studies/sst2-collapse --config configs/study_sst2_collapse.toml \
        --command "fed-plora study --config configs/study_sst2_collapse.toml --data-dir ../shared/data" \
        --compare moderate-holders/fedplora,moderate/fedit
``--compare A,B`` adds ``B − A`` paired by seed across settings, with its 95% interval.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from fed_plora.fl.study.stats import mean_std, paired_difference

from .common import RESULTS_DIR, environment


def final_by_seed(rows: list[dict], cell: str) -> dict[int, float]:
    """``{seed: final metric}`` of ``cell`` = ``"<setting>/<method>"``."""
    setting, method = cell.split("/")
    return {r["seed"]: r["final"] for r in rows if r["setting"] == setting and r["method"] == method}


def compare(rows: list[dict], pair: str) -> dict:
    """``pair`` = ``"A,B"`` (cells ``<setting>/<method>``): mean ± std of each over its seeds and ``B − A`` paired
    by seed with its 95% interval, so that methods run in different settings of the same seeds (a method's
    variant beside baselines that do not depend on it) can be compared as the report compares one setting."""
    first, second = pair.split(",")
    a, b = final_by_seed(rows, first), final_by_seed(rows, second)
    if not a or not b:
        raise SystemExit(f"--compare {pair}: no finished rows for {first if not a else second}")
    d = paired_difference(b, a)
    return {
        "a": first,
        "b": second,
        "a_mean_std": mean_std(list(a.values())),
        "b_mean_std": mean_std(list(b.values())),
        "b_minus_a": {"n": d.n, "mean": d.mean, "std": d.std, "low": d.low, "high": d.high, "verdict": d.verdict},
    }


def majority_cells(rows: list[dict], margin: float) -> dict[str, dict[str, list[int]]]:
    """Per setting and federated method, the seeds whose final metric is within ``margin`` of the majority
    class's. The majority row of a seed serves every setting of that seed (a setting that runs no reference
    rows has the same training data, hence the same majority class, as one that does)."""
    majority = {r["seed"]: r["final"] for r in rows if r["method"] == "majority"}
    found: dict[str, dict[str, list[int]]] = defaultdict(dict)
    for r in rows:
        if r["kind"] != "federated":
            continue
        seeds = found[r["setting"]].setdefault(r["method"], [])
        floor = majority.get(r["seed"])
        if floor is not None and r["final"] is not None and r["final"] <= floor + margin:
            seeds.append(r["seed"])
    return dict(found)


def cell_wall_s(rows: list[dict]) -> dict[str, float]:
    """Seconds of timed stages per cell (the sum over its methods and reference rows)."""
    walls: dict[str, float] = defaultdict(float)
    for r in rows:
        walls[f"{r['setting']}/seed{r['seed']}"] += r["wall_s"] or 0.0
    return dict(walls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--config", required=True, help="the study file the study ran from")
    parser.add_argument("--command", required=True, help="the command that ran it, as recorded")
    parser.add_argument("--majority-margin", type=float, default=0.02)
    parser.add_argument(
        "--compare", action="append", default=[], help="'SETTING/METHOD,SETTING/METHOD': B − A paired by seed (repeatable)"
    )
    parser.add_argument("--out", type=Path, help="default: bench/results/study_<name>-<device>.json")
    args = parser.parse_args(argv)
    summary = json.loads((args.study_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (args.study_dir / "results.jsonl").read_text().splitlines() if line.strip()]
    env = environment()
    record = {
        "command": args.command,
        "study_config": args.config,
        "environment": env,
        "cell_wall_s": cell_wall_s(rows),
        "majority_margin": args.majority_margin,
        "final_at_majority": majority_cells(rows, args.majority_margin),
        "compared": [compare(rows, pair) for pair in args.compare],
        "summary": summary,
        "rows": rows,
        "report_md": (args.study_dir / "report.md").read_text(),
    }
    name = summary["study"].replace("-", "_")
    out = args.out or RESULTS_DIR / f"study_{name}-{env['device'].replace(' ', '_').lower()}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
