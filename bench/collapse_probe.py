"""Round-by-round anatomy of a federated run: why a global model swings or collapses to one class.

Runs each method of a run config with the clients in this process (as ``fed-plora run`` does) and records,
every round:

- per client: rank, data size, share of positive labels, trained modules, mean train loss, the norm of its
  adapter update ``‖ΔW_end − ΔW_start‖_F`` and of its head update (the other trainable tensors);
- per aggregation: how many clients held each module, the global update's norm before and after, the norm
  of the global step ``‖ΔW_new − ΔW_old‖_F`` against the step of the ideal average ``Σ p_i ΔW_i``, and the
  head's step against the mean client head step;
- the evaluation of the global model (classification tasks): accuracy, share predicted positive, logit
  margin (class 1 minus class 0: mean and spread), and the same with the adapter removed (head and pooler
  alone) and with the head reset to the round's start (adapter alone), to say which part moved the logits.

Every norm is over all adapted layers together, from factors (``lowrank``), in float64.

    python -m bench.collapse_probe --config configs/sst2_minilm.toml --data-dir ../shared/data \
        --methods fedplora fedit hetlora --seed 5 --set 'federation.rank_scheme="fixed"' \
        --set 'federation.rank_choices=[1, 2, 1, 2, 16, 1, 2, 1, 2, 16]' --out bench/results/collapse_severe_s5.json

``--plot FILE.png`` draws a record (``--from`` a JSON written before, without running anything).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from fed_plora.fl.config import load_config
from fed_plora.fl.data.tokenize import collate
from fed_plora.fl.device import pick_device, precision
from fed_plora.fl.federation import build_federation
from fed_plora.fl.model import load_model, load_tokenizer, write_adapter
from fed_plora.fl.rounds.client import fit, fit_settings
from fed_plora.fl.rounds.run_server import RunServer
from fed_plora.fl.rounds.server import ClientResult
from fed_plora.fl.strategies.lowrank import Factors, merged, squared_distance, squared_norm

from .common import environment


def adapter_distance(new: dict[str, Factors], old: dict[str, Factors]) -> float:
    """``‖new − old‖_F`` over all layers together, from factors."""
    return math.sqrt(sum(squared_distance(new[n], old[n]) for n in new))


def adapter_norm(adapter: dict[str, Factors]) -> float:
    return math.sqrt(sum(squared_norm(f) for f in adapter.values()))


def tensors_distance(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((new[k].double() - old[k].double()).pow(2).sum()) for k in new))


@torch.no_grad()
def logit_margins(model, features: list[dict], pad_id: int, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(margins [n], labels [n])``: logit of class 1 minus class 0 for every evaluation example."""
    model.eval()
    margins, labels = [], []
    by_length = sorted(features, key=lambda f: len(f["input_ids"]))  # little padding; the summary is order-free
    for start in range(0, len(by_length), batch_size):
        batch = collate(by_length[start : start + batch_size], pad_id)
        labels.append(batch.pop("labels"))
        logits = model(**batch).logits.float()
        margins.append(logits[:, 1] - logits[:, 0])
    return torch.cat(margins), torch.cat(labels)


def margin_summary(margins: torch.Tensor, labels: torch.Tensor) -> dict:
    predicted = (margins > 0).long()
    return {
        "accuracy": float((predicted == labels).float().mean()),
        "predicted_positive": float(predicted.float().mean()),
        "margin_mean": float(margins.mean()),
        "margin_std": float(margins.std()),
    }


def evaluate_parts(server: RunServer, start_extra: dict[str, torch.Tensor], pad_id: int) -> dict:
    """The global model's margins; the same with a zero adapter (head alone) and with the round's starting
    head (adapter alone)."""
    strategy, model, features = server.strategy, server.model, server.fed.eval
    zero = {n: Factors(torch.zeros_like(f.a), torch.zeros_like(f.b)) for n, f in strategy.global_adapter().items()}
    out = {}
    for part, adapter, extra in (
        ("full", strategy.global_adapter(), strategy.extra),
        ("head_only", zero, strategy.extra),
        ("adapter_only", strategy.global_adapter(), start_extra),
    ):
        write_adapter(model, adapter, extra)
        margins, labels = logit_margins(model, features, pad_id)
        out[part] = margin_summary(margins, labels)
    write_adapter(model, strategy.global_adapter(), strategy.extra)
    return out


def probe_method(config, method, fed, tokenizer, device, base_dtype, autocast_dtype, eval_every, positive, on_round):
    """One method's rounds with the measurements of the module docstring (``positive``: every client's share of
    positive labels); ``on_round(rows)`` after every round."""
    model = load_model(config.model.name, fed.task, tokenizer.pad_token_id, config.run.seed, device, base_dtype)
    server = RunServer(config, method, fed, model, tokenizer, autocast_dtype)
    rows = []
    while server.rounds_done < config.federation.rounds:
        planned = server.plan_round()
        old_adapter = {n: Factors(f.a.clone(), f.b.clone()) for n, f in server.strategy.global_adapter().items()}
        old_extra = {k: v.clone() for k, v in server.strategy.extra.items()}
        results, clients = [], []
        for plan in planned.plans:
            features = fed.client_features(plan.client)
            settings = fit_settings(config, planned.rnd, plan.client, len(features), tokenizer.pad_token_id, autocast_dtype)
            update, stats = fit(model, plan, features, **settings)
            results.append(ClientResult(update, stats, seconds=stats.seconds))
            first = next(iter(plan.trained))
            clients.append(
                {
                    "client": plan.client,
                    "rank": len(plan.trained[first]),
                    "examples": len(features),
                    "positive_share": positive[plan.client],
                    "trained": plan.trained[first].tolist(),
                    "loss": stats.loss,
                    "adapter_step": adapter_distance(update.adapter, plan.adapter),
                    "head_step": tensors_distance(update.extra, plan.extra),
                }
            )
        updates = [r.update for r in results]
        sizes = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights = (sizes / sizes.sum()).tolist()
        ideal = {n: merged([(w, u.adapter[n]) for w, u in zip(weights, updates)]) for n in old_adapter}
        record = server.finish_round(planned, results)
        new_adapter = server.strategy.global_adapter()
        holders = torch.zeros(server.strategy.rank, dtype=torch.long)
        for c in clients:
            holders[c["trained"]] += 1
        row = {
            "round": planned.rnd + 1,
            "clients": clients,
            "train_loss": record["train_loss"],
            "agg_noise": record["agg_noise"],
            "holders": holders.tolist(),
            "global_norm": adapter_norm(new_adapter),
            "global_step": adapter_distance(new_adapter, old_adapter),
            "ideal_step": adapter_distance(ideal, old_adapter),
            "head_step": tensors_distance(server.strategy.extra, old_extra),
            "mean_client_head_step": sum(w * c["head_step"] for w, c in zip(weights, clients)),
        }
        if row["round"] % eval_every == 0 or row["round"] == config.federation.rounds:
            row["eval"] = evaluate_parts(server, old_extra, tokenizer.pad_token_id)
        rows.append(row)
        parts = row.get("eval", {})
        shown = " ".join(
            f"{part} acc {e['accuracy']:.3f} pos {e['predicted_positive']:.2f} "
            f"margin {e['margin_mean']:+.2f}±{e['margin_std']:.2f}"
            for part, e in parts.items()
        )
        print(
            f"{method} round {row['round']:2d}: ranks {[c['rank'] for c in clients]} "
            f"pos {[round(c['positive_share'], 2) for c in clients]} loss {row['train_loss']:.3f} "
            f"step {row['global_step']:.3f} (ideal {row['ideal_step']:.3f}) norm {row['global_norm']:.3f} "
            f"head {row['head_step']:.3f} | {shown}",
            flush=True,
        )
        on_round(rows)
    return rows


def plot(result: dict, path: Path) -> None:
    """One column per method: accuracy and share predicted positive; the logit margin of the global model, of
    its head alone and of its adapter alone; the global step against the ideal average's step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["methods"])
    top = max(result["client_ranks"])
    fig, axes = plt.subplots(3, len(methods), figsize=(4.2 * len(methods), 8.5), sharex=True, squeeze=False)
    for col, method in enumerate(methods):
        rows = result["methods"][method]
        rounds = [r["round"] for r in rows if "eval" in r]
        evals = [r["eval"] for r in rows if "eval" in r]
        ax = axes[0][col]
        ax.plot(rounds, [e["full"]["accuracy"] for e in evals], "o-", label="accuracy")
        ax.plot(rounds, [e["full"]["predicted_positive"] for e in evals], "s--", label="share predicted positive")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(method)
        ax = axes[1][col]
        for part, label in (
            ("full", "global model"),
            ("head_only", "head alone (adapter zeroed)"),
            ("adapter_only", "adapter with round-start head"),
        ):
            ax.errorbar(
                rounds, [e[part]["margin_mean"] for e in evals], [e[part]["margin_std"] for e in evals], capsize=2, label=label
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax = axes[2][col]
        every = [r["round"] for r in rows]
        ax.plot(every, [r["global_step"] for r in rows], "o-", label="global step")
        ax.plot(every, [r["ideal_step"] for r in rows], "x--", label="step of Σ p_i ΔW_i")
        for r in rows:
            if any(c["rank"] == top for c in r["clients"]):
                ax.axvspan(r["round"] - 0.4, r["round"] + 0.4, color="orange", alpha=0.15, lw=0)
        ax.set_xlabel(f"round (shaded: a rank-{top} client took part)")
    axes[0][0].set_ylabel("dev set")
    axes[1][0].set_ylabel("logit margin (class 1 − 0), mean ± std")
    axes[2][0].set_ylabel("‖ΔW change‖_F, all layers")
    for row in axes:
        row[-1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="the run config (required unless --from is given)")
    parser.add_argument("--set", action="append", default=[], help="section.key=value (TOML), as fed-plora run")
    parser.add_argument("--methods", nargs="+", default=["fedplora", "fedit", "hetlora"])
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-dir")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--out", help="JSON file written with every round's measurements")
    parser.add_argument("--plot", help="PNG file drawn from the record at the end")
    parser.add_argument("--from", dest="source", help="draw --plot from this record instead of running")
    args = parser.parse_args(argv)
    if args.source:
        if not args.plot:
            parser.error("--from needs --plot")
        plot(json.loads(Path(args.source).read_text()), Path(args.plot))
        return
    if not args.out or not args.config:
        parser.error("--config and --out are required unless --from is given")
    overrides = list(args.set)
    if args.seed is not None:
        overrides.append(f"run.seed={args.seed}")
    if args.data_dir:
        overrides.append(f"task.data_dir={json.dumps(args.data_dir)}")
    config = load_config(args.config, overrides)
    config.validate()
    device = pick_device(config.run.device)
    base_dtype, autocast_dtype = precision(config.model.precision, device)
    tokenizer = load_tokenizer(config.model.name)
    fed = build_federation(config, tokenizer)
    start = time.perf_counter()
    positive = [sum(fed.train[i]["labels"] for i in shard) / len(shard) for shard in fed.shards]
    result = {
        "benchmark": "collapse_probe",
        "command": "python -m bench.collapse_probe " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "config": config.to_dict(),
        "client_ranks": fed.ranks,
        "client_positive_share": positive,
        "client_examples": [len(s) for s in fed.shards],
        "methods": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(rows: list[dict], method: str) -> None:  # after every round: a long probe is readable while it runs
        result["methods"][method] = rows
        result["wall_s"] = time.perf_counter() - start
        out.write_text(json.dumps(result, indent=1) + "\n")

    for method in args.methods:
        settings = (config, method, fed, tokenizer, device, base_dtype, autocast_dtype, args.eval_every, positive)
        probe_method(*settings, lambda rows, m=method: save(rows, m))
    if args.plot:
        plot(result, Path(args.plot))


if __name__ == "__main__":
    main()
