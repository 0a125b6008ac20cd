"""The server of a ``fed-plora`` run: a ``Server`` (``fl.rounds``) with the run's model and measurements.

A ``FederatedServer`` builds its strategy from the run config over the global model (a backbone with PLoRA
injected here), merges any base update into that model, evaluates it every k rounds, and writes each
round's costs, noise, timings and memory into the record.
"""

from __future__ import annotations

import resource
import time

import numpy as np
import torch

from fed_plora import plora

from . import costs, noise
from .checkpoint import Checkpoint
from .config import Config
from .evaluation import evaluate
from .model import inject_configured, linear_weight_count, read_adapter, write_adapter
from .rounds import ClientResult, RoundPlan, Server, round_info
from .strategies import Adapter, ClientPlan, ClientUpdate, RoundResult, strategy_class


class FederatedServer(Server):
    """One method's server over ``model`` (a freshly loaded backbone, PLoRA injected here); ``fed``: the
    run's ``Federation`` (client rank budgets, the client shards whose sizes weigh the clients, task and
    evaluation data).

    ``resume``: continue from that checkpoint of the same config (base updates are replayed, RNGs and
    records restored).
    """

    def __init__(
        self,
        config: Config,
        method: str,
        fed,
        model: torch.nn.Module,
        tokenizer,
        autocast_dtype,
        resume: Checkpoint | None = None,
    ):
        self.fed, self.model, self.tokenizer, self.autocast_dtype = fed, model, tokenizer, autocast_dtype
        self.device = next(model.parameters()).device
        inject_configured(model, config)
        adapter, extra = read_adapter(model)
        strategy = strategy_class(method).from_config(config, adapter, extra, fed.ranks)
        super().__init__(strategy, config, fed.ranks, resume, client_sizes=[len(shard) for shard in fed.shards])
        self.head_params = sum(t.numel() for t in extra.values())
        self.frozen_params = linear_weight_count(model) - self.head_params
        self.shapes = {n: (f.b.shape[0], f.a.shape[1]) for n, f in adapter.items()}
        for update in self.strategy.merged_updates():  # a resumed FLoRA's stacks; none for a fresh strategy
            plora.merge_into_base(model, update)

    def plan_round(self) -> RoundPlan:
        """``Server.plan_round`` with the global update before the round (resets the CUDA peak-memory counter)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        global_update = {n: self.strategy.global_factors(n) for n in self.shapes}
        planned = super().plan_round()
        planned.global_update = global_update
        return planned

    def finish_round(self, planned: RoundPlan, results: list[ClientResult]) -> dict:
        """``Server.finish_round`` with the round's costs and noise, the evaluation when due, timings and memory."""
        rnd = planned.rnd
        accepted, faults = self.screen(planned, results)
        timer = dict(prepare=0.0, train=0.0, aggregate=0.0, evaluate=0.0)
        rows = []
        for plan, result in accepted:
            timer["train"] += result.stats.seconds
            timer["prepare"] += max(result.seconds - result.stats.seconds, 0.0)
            rows.append({**self._client_costs(plan, result.update, result.stats, planned.global_update), **result.wire})
        updates = [result.update for _, result in accepted]
        start = time.perf_counter()
        aggregated = self.aggregate(rnd, updates)
        timer["aggregate"] = time.perf_counter() - start
        record = {
            **self.participation(planned, accepted),
            "agg_noise": self._aggregation_noise(aggregated, updates) if updates else None,
            "server_flops": aggregated.server_flops if aggregated else 0.0,
            **mean_costs(rows),
            "faults": faults,
        }
        if (rnd + 1) % self.config.train.eval_every == 0 or rnd + 1 == self.config.federation.rounds:
            start = time.perf_counter()
            record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            timer["evaluate"] = time.perf_counter() - start
        record.update({f"time_{k}_s": v for k, v in timer.items()})
        record.update(memory_fields(self.device))
        record.update(round_info(aggregated))
        self.records.append(record)
        return record

    def aggregate(self, rnd: int, updates: list[ClientUpdate]) -> RoundResult | None:
        """``Server.aggregate``, then any base update merged into the global model for good (FLoRA)."""
        aggregated = super().aggregate(rnd, updates)
        if aggregated is not None and aggregated.base_update is not None:
            plora.merge_into_base(self.model, aggregated.base_update)
        return aggregated

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of the global model on the evaluation split."""
        write_adapter(self.model, self.strategy.global_adapter(), self.strategy.extra)
        tcfg = self.config.train
        return evaluate(
            self.model,
            self.fed.task,
            self.fed.eval,
            self.tokenizer,
            batch_size=tcfg.eval_batch_size,
            max_new_tokens=self.config.task.max_new_tokens,
            autocast_dtype=self.autocast_dtype,
        )

    def _client_costs(self, plan: ClientPlan, update: ClientUpdate, stats, global_update: Adapter) -> dict:
        """One client's traffic, trainable parameters, FLOPs and initialisation noise."""
        trainable = trainable_params(update, self.head_params)
        fold = plan.client_flops
        for name, (n_out, k_in) in self.shapes.items():
            folded = torch.ones(plan.adapter[name].b.shape[1], dtype=torch.bool)
            folded[plan.trained[name].cpu()] = False
            live = int((plan.adapter[name].b.cpu()[:, folded] != 0).any(0).sum())
            fold += costs.fold_flops(n_out, k_in, live) if plan.fold_mode == "merge" else 0.0
        down, up = costs.payload_bytes(plan.download), costs.payload_bytes(update.upload())
        return {
            "bytes_down_bf16": down["bf16"],
            "bytes_down_fp32": down["fp32"],
            "bytes_up_bf16": up["bf16"],
            "bytes_up_fp32": up["fp32"],
            "trainable_params": trainable,
            "train_flops": costs.training_flops(stats.tokens, self.frozen_params, trainable),
            "fold_flops": fold,
            "init_noise": noise.initialisation_noise((plan.adapter[n], global_update[n]) for n in self.shapes),
        }

    def _aggregation_noise(self, aggregated: RoundResult, updates: list[ClientUpdate]) -> float | None:
        """Noise of the new global update against ``Σ p_i ΔW_i`` with data-size weights ``p_i``."""
        sizes = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights = (sizes / sizes.sum()).tolist()
        return noise.round_aggregation_noise(self.strategy, aggregated.base_update, updates, weights)


def trainable_params(update: ClientUpdate, head_params: int) -> int:
    """Parameters a client trained: the head's and, per layer, ``r · (N + K)`` for its ``r`` trained modules."""
    return head_params + sum(len(update.trained[n]) * (f.b.shape[0] + f.a.shape[1]) for n, f in update.adapter.items())


def memory_fields(device: torch.device) -> dict:
    """A record's peak memory and what it measures."""
    kind = "cuda_max_allocated" if device.type == "cuda" else "process_max_rss"
    return {"peak_memory_bytes": peak_memory_bytes(device), "peak_memory_kind": kind}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


#: Per-client cost fields averaged over the accepted clients of a round.
MEAN_KEYS = ("bytes_down_bf16", "bytes_down_fp32", "bytes_up_bf16", "bytes_up_fp32", "trainable_params")


def mean_costs(rows: list[dict]) -> dict:
    """Per-client means of traffic (and of any ``ClientResult.wire`` field) and trainable parameters,
    sums of FLOPs, mean and max init noise (over the accepted clients; means are None when there is none)."""
    if not rows:
        keys = (*MEAN_KEYS, "init_noise", "init_noise_max")
        return {**dict.fromkeys(keys), "train_flops": 0.0, "fold_flops": 0.0}
    wire = [k for k in rows[0] if k not in (*MEAN_KEYS, "train_flops", "fold_flops", "init_noise")]
    out = {k: float(np.mean([r[k] for r in rows])) for k in (*MEAN_KEYS, *wire)}
    out.update({k: float(sum(r[k] for r in rows)) for k in ("train_flops", "fold_flops")})
    noise = [r["init_noise"] for r in rows]
    known = [v for v in noise if v is not None]
    out["init_noise"] = float(np.mean(known)) if len(known) == len(noise) else None
    out["init_noise_max"] = max(known) if len(known) == len(noise) else None
    return out
