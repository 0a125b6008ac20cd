"""A whole run: the shared data, then each method on a freshly loaded backbone, written to a run directory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .data import get_task, load_examples, resolve_data_dir
from .data.tokenize import encode_classification, encode_generation_eval, encode_generation_train
from .device import pick_device, precision
from .model import load_model, load_tokenizer
from .partition import assign_ranks, partition
from .report import RunWriter
from .simulator import Federation, simulate
from .strategies import STRATEGIES


def _subset(items: list, limit: int | None, rng: np.random.Generator) -> list:
    if limit is None or limit >= len(items):
        return items
    return [items[i] for i in sorted(rng.choice(len(items), size=limit, replace=False))]


def build_federation(config: Config, tokenizer) -> Federation:
    """Load, subsample, partition and tokenise the task's data; draw the client ranks."""
    task = get_task(config.task.name)
    data_dir = resolve_data_dir(config.task.data_dir)
    seed, fcfg = config.run.seed, config.federation
    train = _subset(
        load_examples(task.name, "train", data_dir), config.task.max_train_examples, np.random.default_rng([seed, 10])
    )
    evals = _subset(load_examples(task.name, "eval", data_dir), config.task.max_eval_examples, np.random.default_rng([seed, 11]))
    shards = partition(train, fcfg.partition, fcfg.clients, np.random.default_rng([seed, 12]), fcfg.dirichlet_alpha)
    length = config.task.max_length
    if task.kind == "classification":
        train_f, eval_f = encode_classification(train, tokenizer, length), encode_classification(evals, tokenizer, length)
    else:
        train_f, eval_f = encode_generation_train(train, tokenizer, length), encode_generation_eval(evals, tokenizer, length)
    return Federation(task, train_f, eval_f, shards, client_ranks(config))


def client_ranks(config: Config) -> list[int]:
    """Every client's rank budget, drawn by ``federation.rank_scheme`` from the run seed."""
    fcfg = config.federation
    return assign_ranks(
        fcfg.rank_scheme, fcfg.clients, np.random.default_rng([config.run.seed, 13]), list(fcfg.rank_choices), config.model.rank
    )


def client_summary(fed: Federation) -> list[dict]:
    """Per client: data size, rank budget and label counts (where labels exist)."""
    out = []
    for c, shard in enumerate(fed.shards):
        row = {"client": c, "examples": len(shard), "rank": fed.ranks[c]}
        labels = [fed.train[i]["labels"] for i in shard if isinstance(fed.train[i].get("labels"), int)]
        if labels:
            row["label_counts"] = {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
        out.append(row)
    return out


def run_experiment(
    config: Config, command: str = "", progress: bool = True, resume: bool = False, rounds: Callable = simulate
) -> tuple[Path, str]:
    """Run every method of ``config`` and write the run directory; returns ``(directory, table)``.

    A checkpoint is written after every round. ``resume``: continue the run already in the directory
    from its checkpoints (``metrics.jsonl`` is cut back to them, finished methods are not re-run).
    ``rounds``: what runs one method's rounds, with the signature of ``simulate`` (the default: clients
    in this process; ``fl.flower.server_app`` passes clients on Flower nodes).
    """
    unknown = [m for m in config.methods.names if m not in STRATEGIES]
    if unknown:
        raise KeyError(f"unknown methods {unknown}; choose from {', '.join(STRATEGIES)}")
    device = pick_device(config.run.device)
    base_dtype, autocast_dtype = precision(config.model.precision, device)
    directory = Path(config.run.out_dir) / config.run.name
    saved = {m: load_checkpoint(directory / "checkpoints", m) for m in config.methods.names} if resume else {}
    writer = RunWriter(directory, [r for c in saved.values() if c is not None for r in c.records])
    if not resume:
        writer.write_json("config.json", {**config.to_dict(), "command": command})
    tokenizer = load_tokenizer(config.model.name)
    fed = build_federation(config, tokenizer)
    writer.write_json("clients.json", client_summary(fed))
    task = fed.task
    results = {}
    for method in config.methods.names:
        checkpoint = saved.get(method)
        if checkpoint is not None and checkpoint.rounds_done >= config.federation.rounds:
            results[method] = checkpoint.records
            continue
        model = load_model(config.model.name, task, tokenizer.pad_token_id, config.run.seed, device, base_dtype)
        done = checkpoint.rounds_done if checkpoint else 0
        bar = tqdm(total=config.federation.rounds, initial=done, desc=f"{method:>9}", disable=not progress, leave=True)

        def on_round(record: dict, bar: tqdm = bar) -> None:
            writer.append(record)
            shown = {"loss": record["train_loss"], task.metric: record.get(f"eval_{task.metric}")}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})  # None: no update, no eval
            bar.update()

        results[method] = rounds(
            config,
            method,
            fed,
            model,
            tokenizer,
            autocast_dtype,
            on_round,
            resume=checkpoint,
            on_checkpoint=lambda c: save_checkpoint(writer.checkpoints, c),
        )
        bar.close()
        del model
    table = writer.finish(results, task.metric, command)
    return writer.dir, table


def resume_experiment(directory: Path, progress: bool = True, data_dir: str | None = None) -> tuple[Path, str]:
    """Continue the run in ``directory`` (killed or finished) with its own ``config.json``; the results
    equal those of an uninterrupted run. ``data_dir`` replaces the recorded data directory (same data)."""
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a run directory: no config.json")
    saved = json.loads(path.read_text())
    command = saved.pop("command", "")
    config = Config.from_dict(saved)
    config.run.out_dir, config.run.name = str(directory.parent), directory.name
    if data_dir is not None:
        config.task.data_dir = data_dir
    return run_experiment(config, command, progress, resume=True)
