"""A study's plots (matplotlib, Agg): the final metric per setting and method with std error bars, metric
curves over rounds with ±std bands, and the metric against cumulative traffic per client."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..storage import write_figure
from .stats import mean_std


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _methods(rows: list[dict]) -> list[str]:
    """Federated methods first (in their order), then references."""
    ordered = [r["method"] for r in rows if r["kind"] == "federated"] + [r["method"] for r in rows if r["kind"] == "reference"]
    return list(dict.fromkeys(ordered))


def _colours(methods: list[str]) -> dict:
    cycle = _pyplot().rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def plot_metric(settings: dict, path: Path) -> Path:
    """Per setting, each method's mean final metric as a point with its std as an error bar (side by side)."""
    plt = _pyplot()
    methods = list(dict.fromkeys(m["method"] for s in settings.values() for m in s["methods"]))
    colours, offset = _colours(methods), 0.6 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 2.0 * len(settings) + 2), 4.5))
    for i, method in enumerate(methods):
        xs, means, stds = [], [], []
        for x, s in enumerate(settings.values()):
            entry = next((m for m in s["methods"] if m["method"] == method), None)
            if entry is not None and entry["final"]["mean"] is not None:
                xs.append(x + (i - (len(methods) - 1) / 2) * offset)
                means.append(entry["final"]["mean"])
                stds.append(entry["final"]["std"] or 0.0)
        ax.errorbar(xs, means, yerr=stds, fmt="o", capsize=3, label=method, color=colours[method])
    ax.set_xticks(range(len(settings)), [f"{name}\n({s['metric']})" for name, s in settings.items()])
    ax.set_ylabel("final metric (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_figure(path, fig)
    plt.close(fig)
    return path


def _mean_curve(rows: list[dict], x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Over the seeds' curves, per round: mean x (``x_key``), mean metric and its std (0 for one seed)."""
    rounds = sorted({p["round"] for r in rows for p in r["curve"]})
    xs, means, stds = [], [], []
    for k in rounds:
        points = [p for r in rows for p in r["curve"] if p["round"] == k]
        metric_mean, metric_std = mean_std([p["metric"] for p in points])
        xs.append(mean_std([p[x_key] for p in points])[0])
        means.append(metric_mean)
        stds.append(metric_std or 0.0)
    return np.array(xs, dtype=float), np.array(means, dtype=float), np.array(stds, dtype=float)


def _panels(rows: list[dict], settings: list[str], x_key: str, xlabel: str, path: Path, band: bool) -> Path:
    """One panel per setting, one mean curve per method (a method with one point, or without traffic on a
    traffic axis, such as a reference: a dashed level at its final value)."""
    plt = _pyplot()
    colours = _colours(_methods(rows))
    columns = min(len(settings), 3)
    lines = -(-len(settings) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5 * columns, 3.8 * lines), squeeze=False)
    for ax, setting in zip(axes.flat, settings):
        mine = [r for r in rows if r["setting"] == setting]
        for method in _methods(mine):
            xs, means, stds = _mean_curve([r for r in mine if r["method"] == method], x_key)
            if len(xs) == 0:
                continue
            if len(xs) == 1 or (x_key != "round" and xs[-1] == 0):  # evaluated once, or no traffic: a level
                ax.axhline(means[-1], color=colours[method], linestyle="--", linewidth=1, label=method)
                continue
            ax.plot(xs, means, marker="o", markersize=3, color=colours[method], label=method)
            if band:
                ax.fill_between(xs, means - stds, means + stds, color=colours[method], alpha=0.2)
        ax.set_title(f"{setting} ({mine[0]['metric']})" if mine else f"{setting} (no finished cell)")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(settings) :]:
        ax.set_visible(False)
    fig.tight_layout()
    write_figure(path, fig)
    plt.close(fig)
    return path


def plot_curves(rows: list[dict], settings: list[str], path: Path) -> Path:
    """Per setting, the metric over rounds: mean line and ±std band over seeds, per method."""
    return _panels(rows, settings, "round", "round", path, band=True)


def plot_traffic(rows: list[dict], settings: list[str], path: Path) -> Path:
    """Per setting, the metric against cumulative traffic per client (MiB, down + up, bf16), mean curves."""
    return _panels(rows, settings, "traffic_mib", "cumulative MiB per client (down + up, bf16)", path, band=False)
