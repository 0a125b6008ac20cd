"""What a run leaves behind: per-round JSON lines, curves (PNG) and a summary table comparing methods."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..storage import append_jsonl, atomic_write, atomic_write_json, ensure_directory, write_figure, write_jsonl

#: Bytes per MiB, for the table and plots.
MB = 2**20


def _last(records: list[dict], key: str):
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def mean_of(records: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the records that hold a value of it (None when none does)."""
    values = [r[key] for r in records if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _scaled(value, factor):
    return None if value is None else value * factor


def _flower_traffic(records: list[dict]) -> dict:
    """Mean MiB per client and round of the Flower messages, down and up (only on a Flower run)."""
    if not any(r.get("bytes_down_flower") is not None for r in records):
        return {}
    return {f"{way} MiB/client (Flower)": _scaled(mean_of(records, f"bytes_{way}_flower"), 1 / MB) for way in ("down", "up")}


def _privacy(records: list[dict]) -> dict:
    """The ε spent by the last round and the sum form's mean MiB per client and round up (only with privacy)."""
    if not any(r.get("dp_epsilon") is not None for r in records):
        return {}
    return {"ε": _last(records, "dp_epsilon"), "up MiB/client (sum form)": _scaled(mean_of(records, "bytes_up_sum_bf16"), 1 / MB)}


def summary_rows(results: dict[str, list[dict]], metric: str) -> list[dict]:
    """One row per method: final and best metric, final loss, mean noises, mean traffic per client and
    round (MiB, bf16; and as Flower serialised it, on a Flower run; with privacy, the ε spent and the upload
    in sum form), mean trainable parameters, total FLOPs, peak memory and wall time."""
    rows = []
    for method, records in results.items():
        scores = [r[f"eval_{metric}"] for r in records if f"eval_{metric}" in r]
        rows.append(
            {
                "method": method,
                f"final {metric}": scores[-1] if scores else None,
                f"best {metric}": max(scores) if scores else None,
                "final loss": _last(records, "train_loss"),
                "init noise": mean_of(records, "init_noise"),
                "agg noise": mean_of(records, "agg_noise"),
                "agg noise (modules)": mean_of(records, "agg_noise_modules"),
                "down MiB/client": _scaled(mean_of(records, "bytes_down_bf16"), 1 / MB),
                "up MiB/client": _scaled(mean_of(records, "bytes_up_bf16"), 1 / MB),
                **_flower_traffic(records),
                **_privacy(records),
                "trainable": None if mean_of(records, "trainable_params") is None else int(mean_of(records, "trainable_params")),
                "train TFLOP": sum(r["train_flops"] for r in records) / 1e12,
                "fold+SVD GFLOP": sum(r["fold_flops"] + r["server_flops"] for r in records) / 1e9,
                "peak MiB": max(r["peak_memory_bytes"] for r in records) / MB,
                "wall s": sum(r[k] for r in records for k in r if k.startswith("time_")),
            }
        )
    return rows


def markdown_table(rows: list[dict]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` (floats to 4 significant digits)."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot_curves(results: dict[str, list[dict]], metric: str, path: Path) -> Path:
    """A 2×3 grid of per-round curves, one line per method: metric, loss, both noises, cumulative
    traffic per client (bf16) and wall time per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (f"eval {metric}", lambda rs: [(r["round"], r[f"eval_{metric}"]) for r in rs if f"eval_{metric}" in r]),
        ("train loss", lambda rs: [(r["round"], r["train_loss"]) for r in rs if r["train_loss"] is not None]),
        ("initialisation noise", lambda rs: [(r["round"], r["init_noise"]) for r in rs if r["init_noise"] is not None]),
        ("aggregation noise", lambda rs: [(r["round"], r["agg_noise"]) for r in rs if r["agg_noise"] is not None]),
        (
            "cumulative MiB per client (down + up, bf16)",
            lambda rs: list(
                zip(
                    [r["round"] for r in rs],
                    np.cumsum([((r["bytes_down_bf16"] or 0) + (r["bytes_up_bf16"] or 0)) / MB for r in rs]),
                )
            ),
        ),
        ("wall time per round (s)", lambda rs: [(r["round"], sum(v for k, v in r.items() if k.startswith("time_"))) for r in rs]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (title, series) in zip(axes.flat, panels):
        for method, records in results.items():
            points = series(records)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=method)
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.tight_layout()
    write_figure(path, fig)
    plt.close(fig)
    return path


class RunWriter:
    """The run directory: ``metrics.jsonl`` (one line per method and round, appended as rounds finish),
    ``checkpoints/``, and at the end ``summary.md``, ``summary.json`` and ``curves.png`` (``manifest.json``,
    ``config.json`` and ``clients.json`` are ``run_experiment``'s). Every file is written atomically;
    ``metrics.jsonl`` lines are appended whole; JSON is standard (non-finite floats as strings, ``fl.storage``).

    ``records``: the lines ``metrics.jsonl`` starts with (those of the checkpoints, on resume).
    """

    def __init__(self, directory: Path, records: list[dict] = ()):
        self.dir = ensure_directory(directory)
        self.checkpoints = self.dir / "checkpoints"
        self.metrics_path = self.dir / "metrics.jsonl"
        write_jsonl(self.metrics_path, list(records))

    def write_json(self, name: str, payload) -> Path:
        path = self.dir / name
        atomic_write_json(path, payload)
        return path

    def append(self, record: dict) -> None:
        append_jsonl(self.metrics_path, record)

    def finish(self, results: dict[str, list[dict]], metric: str, command: str) -> str:
        rows = summary_rows(results, metric)
        table = markdown_table(rows)
        atomic_write(self.dir / "summary.md", f"```\n{command}\n```\n\n{table}\n".encode())
        self.write_json("summary.json", rows)
        plot_curves(results, metric, self.dir / "curves.png")
        return table
