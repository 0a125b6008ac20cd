"""Drive the fold / NF4 benchmarks, print the tables with their targets and write
``bench/results/fold-<device>.json``.

    python -m bench.fold                 # full GPU run (plus the fidelity table), or a CPU smoke run
    python -m bench.fold --no-fidelity   # skip the adapter training of bench.nf4_fidelity
    python -m bench.fold -- -k fold_nf4  # arguments after -- go to pytest (select cases)

The targets beside the ratios are ``bench/targets.py``'s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.common import CPU_SMOKE, entry_ms, format_table, on_gpu, ratio, run_suite, write_result
from bench.targets import FOLD_BANDWIDTH, NF4_FOLD_GAIN, NF4_FORWARD, NF4_FORWARD_M

SUITE = Path(__file__).resolve().parent / "bench_fold.py"


def fold_rows(entries: dict) -> list[dict]:
    rows = []
    for n, k in sorted({(e["extra_info"]["N"], e["extra_info"]["K"]) for e in entries.values() if "folded" in e["extra_info"]}):
        get = lambda variant: entries.get(("fold", variant, n, k))
        fold, copy = get("fold"), get("copy")
        moved = fold["extra_info"]["bytes"] if fold else None
        row = {
            "N": n, "K": k,
            "fold_ms": entry_ms(fold), "copy_ms": entry_ms(copy),
            "fold_GBps": ratio(moved, entry_ms(fold) and entry_ms(fold) * 1e6),
            "copy_GBps": ratio(moved, entry_ms(copy) and entry_ms(copy) * 1e6),
            "fold_peak_extra_bytes": fold["extra_info"]["peak_bytes"] if fold else None,
            "fold_nf4_ms": entry_ms(get("fold_nf4")), "peft_merge_nf4_ms": entry_ms(get("peft_merge_nf4")),
        }  # fmt: skip
        row["fold/copy_bandwidth"] = ratio(row["fold_GBps"], row["copy_GBps"])
        row["peft_merge/fold_nf4"] = ratio(row["peft_merge_nf4_ms"], row["fold_nf4_ms"])
        rows.append(row)
    return rows


def forward_rows(entries: dict) -> list[dict]:
    rows = []
    for m, k, n in sorted(
        {(e["extra_info"]["M"], e["extra_info"]["K"], e["extra_info"]["N"]) for e in entries.values() if "M" in e["extra_info"]}
    ):
        get = lambda variant: entry_ms(entries.get(("fwd", variant, m, k, n)))
        row = {
            "M": m, "K": k, "N": n,
            "bf16_fused_ms": get("fwd_bf16"), "nf4_temporary_ms": get("fwd_nf4_temporary"),
            "nf4_fused_ms": get("fwd_nf4_fused"), "bnb_peft_ms": get("fwd_bnb_peft"),
        }  # fmt: skip
        row["nf4_temporary/bf16"] = ratio(row["nf4_temporary_ms"], row["bf16_fused_ms"])
        row["nf4_fused/bf16"] = ratio(row["nf4_fused_ms"], row["bf16_fused_ms"])
        best = min((v for v in (row["nf4_temporary_ms"], row["nf4_fused_ms"]) if v is not None), default=None)
        row["bnb_peft/nf4_best"] = ratio(row["bnb_peft_ms"], best)
        rows.append(row)
    return rows


def index(benchmarks: list[dict]) -> dict:
    entries = {}
    for entry in benchmarks:
        info = entry["extra_info"]
        if "folded" in info:
            entries[("fold", info["variant"], info["N"], info["K"])] = entry
        else:
            entries[("fwd", info["variant"], info["M"], info["K"], info["N"])] = entry
    return entries


def targets(folds: list[dict], forwards: list[dict]) -> list[str]:
    lines = []
    for row in folds:
        shape, bandwidth, gain = f"{row['N']}x{row['K']}", _fmt(row["fold/copy_bandwidth"]), _fmt(row["peft_merge/fold_nf4"])
        lines.append(f"bf16 fold {shape}: {bandwidth} of copy bandwidth (target {FOLD_BANDWIDTH.text()})")
        lines.append(f"NF4 fold {shape}: {gain}x faster than PEFT's 4-bit merge (target {NF4_FOLD_GAIN.text()})")
    for row in forwards:
        if row["M"] == NF4_FORWARD_M or not on_gpu():
            best = min((v for v in (row["nf4_temporary/bf16"], row["nf4_fused/bf16"]) if v is not None), default=None)
            lines.append(
                f"NF4 forward M={row['M']} {row['K']}->{row['N']}: {_fmt(best)}x our bf16 fused forward"
                f" (target {NF4_FORWARD.text()} at M = {NF4_FORWARD_M})"
            )
    return lines


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="fold / NF4 benchmarks")
    parser.add_argument(
        "--fidelity",
        dest="fidelity",
        action="store_true",
        default=on_gpu(),
        help="also run bench.nf4_fidelity (default on a GPU)",
    )
    parser.add_argument("--no-fidelity", dest="fidelity", action="store_false")
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]
    raw = run_suite(SUITE, pytest_args)
    if raw is None:
        return 1
    entries = index(raw["benchmarks"])
    folds, forwards = fold_rows(entries), forward_rows(entries)
    print()
    print(format_table(folds, [
        "N", "K", "fold_ms", "copy_ms", "fold_GBps", "copy_GBps", "fold/copy_bandwidth", "fold_peak_extra_bytes",
        "fold_nf4_ms", "peft_merge_nf4_ms", "peft_merge/fold_nf4",
    ]))  # fmt: skip
    print()
    print(format_table(forwards, [
        "M", "K", "N", "bf16_fused_ms", "nf4_temporary_ms", "nf4_fused_ms", "bnb_peft_ms",
        "nf4_temporary/bf16", "nf4_fused/bf16", "bnb_peft/nf4_best",
    ]))  # fmt: skip
    summary = targets(folds, forwards)
    print("\n" + "\n".join(summary))
    if not on_gpu():
        print(CPU_SMOKE)
    path = write_result("fold", {"folds": folds, "forwards": forwards, "targets": summary, "pytest_benchmark": raw})
    print(f"\nwrote {path}")
    if args.fidelity:
        from bench import nf4_fidelity

        return nf4_fidelity.main([])
    print("fidelity table: python -m bench.nf4_fidelity (trains an adapter; minutes on CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
