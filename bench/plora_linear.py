"""Drive the fused-op benchmark, print the table of ratios and write ``bench/results/plora_linear-<device>.json``.

python -m bench.plora_linear            # full GPU grid, or a smoke run through the interpreter on CPU
python -m bench.plora_linear -k M2048   # extra arguments go to pytest (select cases)
"""

from __future__ import annotations

import sys
from pathlib import Path

from bench.common import entry_ms, ratio, run_and_record

BENCH_FILE = Path(__file__).resolve().parent / "bench_plora_linear.py"


def summarise(benchmarks: list[dict]) -> list[dict]:
    """One row per (M, K, N, active): the fused op's times over its references, measured in this run."""
    by_key: dict[tuple, dict] = {}
    for entry in benchmarks:
        info = entry["extra_info"]
        by_key[(info["M"], info["K"], info["N"], info["active"], info["variant"])] = entry
    rows = []
    for (m, k, n, count, variant), entry in sorted(by_key.items(), key=lambda kv: tuple(str(v) for v in kv[0])):
        if variant != "fused_fwd":
            continue

        def t(name, active=count):
            return entry_ms(by_key.get((m, k, n, active, name)))

        def peak(name):
            found = by_key.get((m, k, n, count, name))
            return found["extra_info"]["peak_bytes"] if found else None

        row = {
            "M": m,
            "K": k,
            "N": n,
            "active": count,
            "fwd_ms": t("fused_fwd"),
            "cublas_fwd_ms": t("cublas_fwd", None),
            "bwd_ms": t("fused_bwd"),
            "cublas_dgrad_ms": t("cublas_dgrad", None),
            "fwdbwd_ms": t("fused_fwdbwd"),
            "unfused_fwd_ms": t("unfused_fwd"),
            "unfused_fwdbwd_ms": t("unfused_fwdbwd"),
            "unsloth_fwdbwd_ms": t("unsloth_fwdbwd"),
            "peak_fwdbwd_MiB": None if peak("fused_fwdbwd") is None else peak("fused_fwdbwd") / 2**20,
            "unfused_peak_fwdbwd_MiB": None if peak("unfused_fwdbwd") is None else peak("unfused_fwdbwd") / 2**20,
            "rel_error_vs_unfused": entry["extra_info"]["rel_error_vs_unfused"],
        }
        row["fwd/cublas"] = ratio(row["fwd_ms"], row["cublas_fwd_ms"])
        row["bwd/cublas_dgrad"] = ratio(row["bwd_ms"], row["cublas_dgrad_ms"])
        row["unfused/fused fwd"] = ratio(row["unfused_fwd_ms"], row["fwd_ms"])
        row["unfused/fused fwd+bwd"] = ratio(row["unfused_fwdbwd_ms"], row["fwdbwd_ms"])
        row["unsloth/fused fwd+bwd"] = ratio(row["unsloth_fwdbwd_ms"], row["fwdbwd_ms"])
        rows.append(row)
    return rows


#: The columns of the printed table.
COLUMNS = [
    "M", "K", "N", "active", "fwd_ms", "cublas_fwd_ms", "fwd/cublas", "bwd_ms", "cublas_dgrad_ms",
    "bwd/cublas_dgrad", "unfused/fused fwd", "unfused/fused fwd+bwd", "unsloth/fused fwd+bwd", "peak_fwdbwd_MiB",
    "unfused_peak_fwdbwd_MiB",
]  # fmt: skip


def main(argv: list[str]) -> int:
    return run_and_record("plora_linear", BENCH_FILE, argv, summarise, COLUMNS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
