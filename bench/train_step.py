"""Drive the training-step benchmark, print PLoRA against PEFT and write ``bench/results/train_step-<device>.json``.

python -m bench.train_step              # GPU grid, or a smoke run through the interpreter on CPU
python -m bench.train_step -k 4bit      # extra arguments go to pytest (select cases)
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import entry_ms, run_and_record

BENCH_FILE = Path(__file__).resolve().parent / "bench_train_step.py"
COLUMNS = [
    "model", "precision", "R", "tokens", "plora_ms", "peft_ms", "plora_tok_s", "peft_tok_s", "speedup",
    "plora_peak_MiB", "peft_peak_MiB", "peak_ratio", "first_loss_diff",
]  # fmt: skip


def summarise(benchmarks: list[dict]) -> list[dict]:
    """One row per (model, precision, R): PLoRA and PEFT from this run, and PLoRA's ratios to PEFT."""
    by_key = {}
    for entry in benchmarks:
        info = entry["extra_info"]
        by_key.setdefault((info["model"], info["precision"], info["R"]), {})[info["library"]] = entry
    rows = []
    for (model, precision, rank), pair in by_key.items():
        if set(pair) != {"plora", "peft"}:
            continue
        ours, theirs = pair["plora"], pair["peft"]
        tokens = ours["extra_info"]["tokens"]
        row = {"model": model, "precision": precision, "R": rank, "tokens": tokens}
        row["plora_ms"], row["peft_ms"] = entry_ms(ours), entry_ms(theirs)
        row["plora_tok_s"], row["peft_tok_s"] = tokens / row["plora_ms"] * 1e3, tokens / row["peft_ms"] * 1e3
        row["speedup"] = row["peft_ms"] / row["plora_ms"]
        peaks = [e["extra_info"]["peak_bytes"] for e in (ours, theirs)]
        row["plora_peak_MiB"], row["peft_peak_MiB"] = (None if p is None else p / 2**20 for p in peaks)
        row["peak_ratio"] = None if None in peaks else peaks[0] / peaks[1]
        row["first_loss_diff"] = abs(ours["extra_info"]["first_loss"] - theirs["extra_info"]["first_loss"])
        rows.append(row)
    return rows


def main(argv: list[str]) -> int:
    return run_and_record("train_step", BENCH_FILE, argv, summarise, COLUMNS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
