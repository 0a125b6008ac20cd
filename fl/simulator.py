"""The federated simulation of one method: one base model in memory, clients in turn on it.

Per round: sample clients; for each, load its plan's adapter, Select-N-Fold (``pristine``, so that
``unfold`` restores the base bit-exactly before the next client), train locally, read back, unfold,
validate the update; then aggregate the valid ones, merge any base update (FLoRA), evaluate the global
model every k rounds, and hand out a checkpoint.
Everything random is seeded from the run seed, the round and the client.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import costs
from .checkpoint import Checkpoint, capture_rng, restore_rng
from .client import evaluate, fit
from .config import Config
from .data import TaskSpec
from .model import inject_plora, linear_weight_count, merge_into_base, read_adapter, write_adapter
from .partition import sample_clients
from .strategies import ClientUpdate, build_strategy
from .validate import RejectedUpdate, validate_update

log = logging.getLogger(__name__)


@dataclass
class Federation:
    """The data side of a run, shared by every method: tokenised features, client shards and ranks."""

    task: TaskSpec
    train: list[dict]
    eval: list[dict]
    shards: list[list[int]]
    ranks: list[int]

    def client_features(self, client: int) -> list[dict]:
        return [self.train[i] for i in self.shards[client]]


def client_seed(seed: int, rnd: int, client: int, stream: int) -> int:
    """A seed for ``stream`` (0: training) of ``client`` in round ``rnd``."""
    return int(np.random.SeedSequence([seed, rnd, client, stream]).generate_state(1)[0])


def local_steps(config: Config, shard_size: int) -> int:
    """Local steps of a client: ``train.local_steps``, or ``local_epochs`` passes over its shard."""
    train = config.train
    if train.local_steps:
        return train.local_steps
    if not train.local_epochs:
        raise ValueError("set train.local_steps > 0 or train.local_epochs > 0")
    return max(1, math.ceil(train.local_epochs * shard_size / train.batch_size))


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _deltas(adapter) -> dict[str, torch.Tensor]:
    return {n: b.float() @ a.float() for n, (a, b) in adapter.items()}


def simulate(
    config: Config,
    method: str,
    fed: Federation,
    model: torch.nn.Module,
    tokenizer,
    autocast_dtype: torch.dtype | None,
    on_round: Callable[[dict], None] = lambda record: None,
    *,
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] = lambda checkpoint: None,
    client_fit: Callable = fit,
) -> list[dict]:
    """Run ``method`` for ``config.federation.rounds`` rounds on ``model`` (a freshly loaded backbone,
    injected here). Returns one record per round (see the README section for the fields).

    ``resume``: continue from that checkpoint (the same config); ``on_checkpoint`` receives one after
    every round, before ``on_round`` sees its record. ``client_fit`` runs one client's round (``fit``).
    A client whose fit raises is dropped from the round, an update that fails ``validate_update`` is
    rejected; both are listed in the record's ``faults``. A round left with no update keeps the global
    state unchanged.
    """
    fcfg, tcfg, mcfg = config.federation, config.train, config.model
    seed = config.run.seed
    device = next(model.parameters()).device
    inject_plora(model, mcfg.rank, mcfg.alpha, mcfg.target_modules, mcfg.dropout, seed, mcfg.extra_trainable)
    adapter, extra = read_adapter(model)
    options = {}
    if method == "fedit":
        options["client_rank"] = config.methods.fedit_rank or min(fed.ranks)
    if method == "hetlora":
        options["prune_gamma"] = config.methods.hetlora_prune_gamma
    strategy = build_strategy(method, adapter, extra, fcfg.weighting, seed, **options)
    fold_mode = config.methods.fold_mode if method == "fedplora" else "merge"
    head_params = sum(t.numel() for t in extra.values())
    frozen_params = linear_weight_count(model) - head_params
    shapes = {n: (f.b.shape[0], f.a.shape[1]) for n, f in adapter.items()}
    records: list[dict] = []
    if resume is not None:
        strategy.load_state(resume.tensors, resume.meta)
        for update in strategy.merged_updates():
            merge_into_base(model, update)
        records = list(resume.records)
        restore_rng(resume.rng)
    for rnd in range(len(records), fcfg.rounds):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        clients = sample_clients(fcfg.clients, fcfg.fraction, np.random.default_rng([seed, rnd]))
        global_delta = {n: strategy.global_delta(n) for n in shapes}
        timer = dict(prepare=0.0, train=0.0, aggregate=0.0, evaluate=0.0)
        updates, losses, rows, faults = [], [], [], []
        for client in clients:
            start = time.perf_counter()
            plan = strategy.configure_client(rnd, client, fed.ranks[client])
            features = fed.client_features(client)
            try:
                update, stats = client_fit(
                    model,
                    plan,
                    features,
                    fold_mode,
                    steps=local_steps(config, len(features)),
                    batch_size=tcfg.batch_size,
                    lr=tcfg.lr,
                    weight_decay=tcfg.weight_decay,
                    seed=client_seed(seed, rnd, client, 0),
                    pad_id=tokenizer.pad_token_id,
                    autocast_dtype=autocast_dtype,
                )
                validate_update(plan, update, fcfg.update_norm_bound)
            except Exception as error:  # a failing client is dropped from the round, never the run
                faults.append(_fault(method, rnd, client, error, device))
                continue
            elapsed = time.perf_counter() - start
            timer["train"] += stats.seconds
            timer["prepare"] += elapsed - stats.seconds
            updates.append(update)
            losses.append(stats.loss)
            rows.append(_client_costs(plan, update, stats, shapes, frozen_params, head_params, global_delta, fold_mode))
        start = time.perf_counter()
        result = strategy.aggregate(rnd, updates) if updates else None
        if result is not None and result.base_update is not None:
            merge_into_base(model, result.base_update)
        timer["aggregate"] = time.perf_counter() - start
        record = {
            "method": method,
            "round": rnd + 1,
            "clients": clients,
            "ranks": [len(next(iter(u.trained.values()))) for u in updates],
            "train_loss": float(np.average(losses, weights=[u.num_examples for u in updates])) if updates else None,
            "agg_noise": _aggregation_noise(strategy, result, updates, shapes) if updates else None,
            "server_flops": result.server_flops if result else 0.0,
            **_mean_costs(rows),
            "faults": faults,
        }
        if (rnd + 1) % tcfg.eval_every == 0 or rnd + 1 == fcfg.rounds:
            start = time.perf_counter()
            write_adapter(model, strategy.global_adapter(), strategy.extra)
            metrics = evaluate(
                model,
                fed.task,
                fed.eval,
                tokenizer,
                batch_size=tcfg.eval_batch_size,
                max_new_tokens=config.task.max_new_tokens,
                autocast_dtype=autocast_dtype,
            )
            timer["evaluate"] = time.perf_counter() - start
            record.update({f"eval_{k}": v for k, v in metrics.items()})
        record.update({f"time_{k}_s": v for k, v in timer.items()})
        record["peak_memory_bytes"] = peak_memory_bytes(device)
        record["peak_memory_kind"] = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
        if result is not None and result.info:
            record["info"] = result.info
        records.append(record)
        tensors, meta = strategy.state()
        on_checkpoint(Checkpoint(method, rnd + 1, tensors, meta, capture_rng(), records))
        on_round(record)
    return records


def _fault(method: str, rnd: int, client: int, error: Exception, device: torch.device) -> dict:
    """The log entry of a dropped client (its fit raised) or a rejected update (validation failed)."""
    stage = "validate" if isinstance(error, RejectedUpdate) else "fit"
    reason = str(error) if stage == "validate" else f"{type(error).__name__}: {error}"
    log.warning("%s round %d: client %d %s: %s", method, rnd + 1, client, "update rejected" if stage == "validate" else "dropped", reason)
    if device.type == "cuda" and isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    return {"client": client, "stage": stage, "reason": reason}


def _client_costs(plan, update, stats, shapes, frozen_params, head_params, global_delta, fold_mode) -> dict:
    """One client's traffic, trainable parameters, FLOPs and initialisation noise."""
    trainable = head_params + sum(len(update.trained[n]) * (n_out + k_in) for n, (n_out, k_in) in shapes.items())
    fold = plan.client_flops
    for name, (n_out, k_in) in shapes.items():
        folded = torch.ones(plan.adapter[name].b.shape[1], dtype=torch.bool)
        folded[plan.trained[name].cpu()] = False
        live = int((plan.adapter[name].b.cpu()[:, folded] != 0).any(0).sum())
        fold += costs.fold_flops(n_out, k_in, live) if fold_mode == "merge" else 0.0
    down, up = costs.payload_bytes(plan.download), costs.payload_bytes(update.upload())
    return {
        "bytes_down_bf16": down["bf16"],
        "bytes_down_fp32": down["fp32"],
        "bytes_up_bf16": up["bf16"],
        "bytes_up_fp32": up["fp32"],
        "trainable_params": trainable,
        "train_flops": costs.training_flops(stats.tokens, frozen_params, trainable),
        "fold_flops": fold,
        "init_noise": costs.initialisation_noise(_deltas(plan.adapter), global_delta),
    }


def _mean_costs(rows: list[dict]) -> dict:
    """Per-client means of traffic and trainable parameters, sums of FLOPs, mean and max init noise
    (over the clients whose update was accepted; means are None when there is none)."""
    if not rows:
        keys = ("bytes_down_bf16", "bytes_down_fp32", "bytes_up_bf16", "bytes_up_fp32", "trainable_params", "init_noise", "init_noise_max")
        return {**dict.fromkeys(keys), "train_flops": 0.0, "fold_flops": 0.0}
    out = {k: float(np.mean([r[k] for r in rows])) for k in ("bytes_down_bf16", "bytes_down_fp32", "bytes_up_bf16", "bytes_up_fp32", "trainable_params")}
    out.update({k: float(sum(r[k] for r in rows)) for k in ("train_flops", "fold_flops")})
    noise = [r["init_noise"] for r in rows]
    known = [v for v in noise if v is not None]
    out["init_noise"] = float(np.mean(known)) if len(known) == len(noise) else None
    out["init_noise_max"] = max(known) if len(known) == len(noise) else None
    return out


def _aggregation_noise(strategy, result, updates: list[ClientUpdate], shapes) -> float | None:
    """Noise of the new global update against ``Σ p_i ΔW_i`` with data-size weights ``p_i``."""
    sizes = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    weights = (sizes / sizes.sum()).tolist()
    ideal = {n: sum(w * u.delta(n) for w, u in zip(weights, updates)) for n in shapes}
    aggregated = {n: strategy.global_delta(n) for n in shapes}
    if result.base_update is not None:
        for name, (a, b) in result.base_update.items():
            aggregated[name] = aggregated[name] + b.float() @ a.float()
    return costs.aggregation_noise(aggregated, ideal)
