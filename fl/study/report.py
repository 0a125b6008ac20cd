"""A study's results and report: ``results.jsonl`` (one row per setting, seed and method, read from the
finished cells' ``metrics.jsonl``), ``summary.json``, ``report.md`` (mean ± std over seeds per setting and
method; the paired difference of each method against the baseline with its 95% confidence interval) and
the plots (``metric.png``, ``curves.png``, ``traffic.png``)."""

from __future__ import annotations

from pathlib import Path

from ..config import Config, toml_literal
from ..run.report import MB, mean_of
from ..storage import atomic_write, atomic_write_json, ensure_directory, read_jsonl, restore_floats, write_jsonl
from ..strategies import STRATEGIES
from .cells import cell_state
from .config import Cell, Study
from .stats import mean_std, paired_difference

#: The numbers of a row summarised over seeds (key, column title; ``{metric}`` is the setting's metric).
MEASURES = (
    ("final", "final {metric}"),
    ("best", "best {metric}"),
    ("agg_noise", "agg noise"),
    ("agg_noise_modules", "agg noise (modules)"),
    ("traffic_mib", "MiB/client"),
    ("train_tflop", "train TFLOP"),
    ("fold_server_gflop", "fold+server GFLOP"),
    ("wall_s", "wall s"),
)


def headline_metric(config: Config, records: list[dict] = ()) -> str:
    """The metric a run of ``config`` is judged by: its task's (``fl.data.task_from_config``, which builds a
    custom task's spec from its files); where that fails (files moved), the first ``eval_*`` key of ``records``."""
    from .. import data

    try:
        make = getattr(data, "task_from_config", None)
        return (make(config.task) if make is not None else data.get_task(config.task.name)).metric
    except Exception:
        keys = [k[5:] for r in records for k in r if k.startswith("eval_")]
        return keys[0] if keys else "metric"


def _total(records: list[dict], keys: tuple[str, ...], scale: float = 1.0) -> float | None:
    values = [r[k] for r in records for k in keys if r.get(k) is not None]
    return sum(values) * scale if values else None


def cell_rows(cell: Cell) -> list[dict]:
    """One row per method of a finished cell: final and best metric, final loss, the mean aggregation noises
    over rounds, traffic per client (down
    + up, bf16, summed over rounds), FLOPs, wall time (the records' ``time_*``) and the curve (round, metric,
    cumulative traffic). Federated methods in the config's order, then any other method (references)."""
    records = [restore_floats(r) for r in read_jsonl(cell.directory / "metrics.jsonl")]
    metric = headline_metric(cell.config, records)
    names = list(cell.config.methods.names)
    names += [m for m in dict.fromkeys(r.get("method") for r in records) if m not in names and isinstance(m, str)]
    rows = []
    for method in names:
        mine = sorted((r for r in records if r.get("method") == method), key=lambda r: r.get("round") or 0)
        if not mine:
            continue
        curve, traffic = [], 0.0
        for r in mine:
            traffic += ((r.get("bytes_down_bf16") or 0) + (r.get("bytes_up_bf16") or 0)) / MB
            if r.get(f"eval_{metric}") is not None:
                curve.append({"round": r.get("round"), "metric": r[f"eval_{metric}"], "traffic_mib": traffic})
        scores = [p["metric"] for p in curve]
        kind = "federated" if method in STRATEGIES else "reference"
        flops = _total(mine, ("fold_flops", "server_flops"), 1e-9)
        rows.append(
            {
                "setting": cell.setting,
                "seed": cell.seed,
                "method": method,
                "kind": kind,
                "metric": metric,
                "rounds": max((r.get("round") or 0) for r in mine),
                "final": scores[-1] if scores else None,
                "best": max(scores) if scores else None,
                "final_loss": next((r["train_loss"] for r in reversed(mine) if r.get("train_loss") is not None), None),
                "agg_noise": mean_of(mine, "agg_noise"),
                "agg_noise_modules": mean_of(mine, "agg_noise_modules"),
                "traffic_mib": traffic,
                "train_tflop": _total(mine, ("train_flops",), 1e-12),
                "fold_server_gflop": flops,
                "wall_s": sum(v for r in mine for k, v in r.items() if k.startswith("time_") and isinstance(v, (int, float))),
                "all_clients_failed": kind == "federated" and all(not r.get("ranks") for r in mine),
                "curve": curve,
            }
        )
    return rows


def summarise(study: Study, rows: list[dict]) -> dict:
    """Per setting: each method's mean ± std over seeds of ``MEASURES`` and its paired difference against
    the baseline (final and best metric; 95% CI)."""
    out = {}
    for setting in study.settings:
        mine = [r for r in rows if r["setting"] == setting]
        methods = list(dict.fromkeys(r["method"] for r in mine if r["kind"] == "federated"))
        methods += list(dict.fromkeys(r["method"] for r in mine if r["kind"] == "reference"))
        table, by_seed = [], {}
        for method in methods:
            runs = [r for r in mine if r["method"] == method]
            by_seed[method] = {r["seed"]: r for r in runs}
            entry = {"method": method, "kind": runs[0]["kind"], "n": len(runs), "seeds": [r["seed"] for r in runs]}
            for key, _ in MEASURES:
                mean, std = mean_std([r[key] for r in runs if r[key] is not None])
                entry[key] = {"mean": mean, "std": std}
            table.append(entry)
        differences = []
        if study.baseline in by_seed:
            base = by_seed[study.baseline]
            for method in methods:
                if method == study.baseline:
                    continue
                entry = {"method": method, "baseline": study.baseline}
                for key in ("final", "best"):
                    d = paired_difference({s: r[key] for s, r in by_seed[method].items()}, {s: r[key] for s, r in base.items()})
                    entry[key] = {"n": d.n, "mean": d.mean, "std": d.std, "low": d.low, "high": d.high, "verdict": d.verdict}
                differences.append(entry)
        cell = study.cell(setting, study.seeds[0])
        out[setting] = {
            "task": cell.config.task.name,
            "metric": mine[0]["metric"] if mine else headline_metric(cell.config),
            "overrides": study.settings[setting],
            "methods": table,
            "differences": differences,
        }
    return out


def _num(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _mean_std(stat: dict) -> str:
    if stat["mean"] is None:
        return "-"
    return _num(stat["mean"]) + ("" if stat["std"] is None else f" ± {stat['std']:.2g}")


def _verdict(d: dict, method: str, baseline: str) -> str:
    return {"better": f"{method} better", "worse": f"{baseline} better"}.get(d["verdict"], d["verdict"])


def _overrides(table: dict) -> str:
    return ", ".join(f"`{k} = {toml_literal(v)}`" for k, v in table.items()) or "none"


def _setting_section(name: str, s: dict, baseline: str) -> list[str]:
    metric = s["metric"]
    lines = [f"## {name}", "", f"Task {s['task']}, metric {metric}. Overrides: {_overrides(s['overrides'])}.", ""]
    if not s["methods"]:
        return [*lines, "No finished cell.", ""]
    titles = [t.format(metric=metric) for _, t in MEASURES]
    lines += ["| method | n | " + " | ".join(titles) + " |", "|---" * (len(titles) + 2) + "|"]
    kind = "federated"
    for m in s["methods"]:
        if m["kind"] != kind:
            kind = m["kind"]
            lines.append(f"| **{kind}** |" + " |" * (len(titles) + 1))
        lines.append(f"| {m['method']} | {m['n']} | " + " | ".join(_mean_std(m[key]) for key, _ in MEASURES) + " |")
    lines.append("")
    if not s["differences"]:
        present = any(m["method"] == baseline for m in s["methods"])
        lines += [f"No paired differences: {baseline} {'is the only method' if present else 'has no finished cell here'}.", ""]
        return lines
    lines += [
        f"Paired difference against {baseline} (method − {baseline}, over the seeds both have; 95% CI from Student's t "
        "with n − 1 degrees of freedom):",
        "",
        f"| method | n | Δ final {metric} | 95% CI | verdict | Δ best {metric} | 95% CI | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in s["differences"]:
        cells = []
        for key in ("final", "best"):
            x = d[key]
            interval = "-" if x["low"] is None else f"[{x['low']:.4g}, {x['high']:.4g}]"
            cells += [_num(x["mean"]), interval, _verdict(x, d["method"], baseline)]
        lines.append(f"| {d['method']} | {d['final']['n']} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(study: Study, settings: dict, missing: list[str], failed: dict[str, str], notes: list[str]) -> str:
    """``report.md``: the cells' status, then per setting the table of methods and the paired differences."""
    total = len(study.cells)
    lines = [
        f"# Study {study.name}",
        "",
        f"`fed-plora study --config {study.path}`: {len(study.settings)} settings × {len(study.seeds)} seeds "
        f"({', '.join(map(str, study.seeds))}); baseline {study.baseline}. Cells finished: {total - len(missing)} of {total}.",
        "",
        f"Base config: {study.base or 'the defaults'}; overrides of every setting: {_overrides(study.common)}.",
        "",
        "Each entry is the mean ± sample standard deviation over the seeds (n). Metrics are the last and the best "
        "evaluated value; traffic is per client, down + up, bf16, summed over rounds; FLOPs and wall time are summed "
        "over rounds (wall time: the rounds' timed stages). Plots: metric.png, curves.png, traffic.png.",
        "",
    ]
    if missing:
        lines += ["**Missing cells** (not run, unfinished or failed; not in the numbers below):", ""]
        lines += [f"- {name}" + (f": failed: {failed[name].splitlines()[0]}" if name in failed else "") for name in missing]
        lines.append("")
    if notes:
        lines += ["**Warnings:**", "", *[f"- {n}" for n in notes], ""]
    for name, s in settings.items():
        lines += _setting_section(name, s, study.baseline)
    return "\n".join(lines)


def write_report(study: Study, failed: dict[str, str] | None = None) -> Path:
    """Collect the finished cells and write ``results.jsonl``, ``summary.json``, ``report.md`` and the plots
    into the study's directory; the path of ``report.md``."""
    from .plots import plot_curves, plot_metric, plot_traffic

    failed = failed or {}
    rows, missing = [], []
    for cell in study.cells:
        if cell_state(cell) == "finished":
            rows += cell_rows(cell)
        else:
            missing.append(cell.name)
    notes = [
        f"{r['setting']}/seed{r['seed']}: every client of every round failed for {r['method']} (untrained results)"
        for r in rows
        if r["all_clients_failed"]
    ]
    settings = summarise(study, rows)
    directory = ensure_directory(study.directory)
    write_jsonl(directory / "results.jsonl", rows)
    summary = {"study": study.name, "baseline": study.baseline, "seeds": study.seeds, "missing": missing, "settings": settings}
    atomic_write_json(directory / "summary.json", summary)
    if rows:
        plot_metric(settings, directory / "metric.png")
        plot_curves(rows, list(study.settings), directory / "curves.png")
        plot_traffic(rows, list(study.settings), directory / "traffic.png")
    path = directory / "report.md"
    atomic_write(path, (markdown(study, settings, missing, failed, notes) + "\n").encode())
    return path
