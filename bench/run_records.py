"""Finished run directories gathered into one benchmark record: per run its command, config, client summary,
its table (``summary.json``) and, per method, the evaluated metric by round with the final and best values.

    python -m bench.run_records runs/a runs/b --what "..." --out bench/results/NAME-cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fed_plora.fl.config import Config

from .common import environment


def run_entry(directory: Path) -> dict:
    """One run directory's command, config (as it ran: fields added since it was written read back with the
    value they had then), clients and per-method curves (from ``metrics.jsonl``)."""
    written = json.loads((directory / "config.json").read_text())
    config = Config.from_dict({k: v for k, v in written.items() if k != "command"}).to_dict()
    metric = f"eval_{config['task'].get('metric') or 'accuracy'}"
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines() if line.strip()]
    methods = {}
    for method in dict.fromkeys(r["method"] for r in records):
        mine = [r for r in records if r["method"] == method]
        curve = [[r["round"], r[metric]] for r in mine if r.get(metric) is not None]
        methods[method] = {
            "rounds": len(mine),
            "curve": curve,
            "final": curve[-1][1] if curve else None,
            "best": max(v for _, v in curve) if curve else None,
            "train_loss": [r.get("train_loss") for r in mine],
            "agg_noise": [r.get("agg_noise") for r in mine],
        }
    summary = directory / "summary.json"
    return {
        "run": directory.name,
        "summary": json.loads(summary.read_text()) if summary.is_file() else None,
        "command": written.get("command", ""),
        "config": config,
        "clients": json.loads((directory / "clients.json").read_text()),
        "methods": methods,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--what", required=True, help="what the runs measure, stored with them")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    record = {"what": args.what, "environment": environment(), "runs": [run_entry(d) for d in args.runs]}
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
