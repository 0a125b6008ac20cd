"""The server side of one method's run, wherever its clients train (in this process or under Flower).

A ``FederatedServer`` owns the global model (for evaluation and FLoRA's base merges) and the strategy.
Per round it hands out the clients' plans (``plan_round``), then takes back one ``ClientResult`` per
planned client and does the rest (``finish_round``): validate, aggregate, merge any base update,
evaluate every k rounds, and build the round's record with its costs and faults. Everything random is
seeded from the run seed, the round and the client.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import costs
from .checkpoint import Checkpoint, capture_rng, restore_rng
from .client import TrainStats, evaluate, fold_mode
from .config import Config
from .model import inject_configured, linear_weight_count, merge_into_base, read_adapter, write_adapter
from .partition import sample_clients
from .strategies import ClientPlan, ClientUpdate, build_strategy
from .validate import RejectedUpdate, validate_update

log = logging.getLogger(__name__)


@dataclass
class RoundPlan:
    """A round as configured: the sampled clients, their plans (same order) and the global update
    ``ΔW`` per layer before the round (unscaled, fp32 ``[N, K]``; the reference of initialisation noise)."""

    rnd: int
    clients: list[int]
    plans: list[ClientPlan]
    global_delta: dict[str, torch.Tensor]


@dataclass
class ClientResult:
    """What came of one planned client: its update and training stats, or the error that dropped it.

    seconds: wall time of the client's whole round (preparation and training) where it ran;
    wire: extra per-client cost fields averaged into the record like the others (Flower's bytes).
    """

    update: ClientUpdate | None = None
    stats: TrainStats | None = None
    error: Exception | None = None
    seconds: float = 0.0
    wire: dict[str, float] = field(default_factory=dict)


class FederatedServer:
    """One method's server over ``model`` (a freshly loaded backbone, PLoRA injected here).

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
        self.config, self.method, self.fed = config, method, fed
        self.model, self.tokenizer, self.autocast_dtype = model, tokenizer, autocast_dtype
        self.device = next(model.parameters()).device
        inject_configured(model, config)
        adapter, extra = read_adapter(model)
        options = {}
        if method == "fedit":
            options["client_rank"] = config.methods.fedit_rank or min(fed.ranks)
        if method == "hetlora":
            options["prune_gamma"] = config.methods.hetlora_prune_gamma
        self.strategy = build_strategy(method, adapter, extra, config.federation.weighting, config.run.seed, **options)
        self.fold_mode = fold_mode(config, method)
        self.head_params = sum(t.numel() for t in extra.values())
        self.frozen_params = linear_weight_count(model) - self.head_params
        self.shapes = {n: (f.b.shape[0], f.a.shape[1]) for n, f in adapter.items()}
        self.records: list[dict] = []
        if resume is not None:
            self.strategy.load_state(resume.tensors, resume.meta)
            for update in self.strategy.merged_updates():
                merge_into_base(model, update)
            self.records = list(resume.records)
            restore_rng(resume.rng)

    @property
    def rounds_done(self) -> int:
        return len(self.records)

    def plan_round(self) -> RoundPlan:
        """Sample the next round's clients and configure each (resets the CUDA peak-memory counter)."""
        rnd, fcfg = self.rounds_done, self.config.federation
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        clients = sample_clients(fcfg.clients, fcfg.fraction, np.random.default_rng([self.config.run.seed, rnd]))
        global_delta = {n: self.strategy.global_delta(n) for n in self.shapes}
        plans = [self.strategy.configure_client(rnd, c, self.fed.ranks[c]) for c in clients]
        return RoundPlan(rnd, clients, plans, global_delta)

    def finish_round(self, planned: RoundPlan, results: list[ClientResult]) -> dict:
        """Validate the results (one per planned client, same order), aggregate the valid ones, evaluate
        when due, and return the round's record (also appended to ``records``). A round left with no
        valid update keeps the global state unchanged."""
        if len(results) != len(planned.plans):
            raise ValueError(f"results: expected one per planned client ({len(planned.plans)}), got {len(results)}")
        rnd, tcfg = planned.rnd, self.config.train
        timer = dict(prepare=0.0, train=0.0, aggregate=0.0, evaluate=0.0)
        updates, losses, rows, faults = [], [], [], []
        for plan, result in zip(planned.plans, results):
            error = result.error
            if error is None:
                try:
                    validate_update(plan, result.update, self.config.federation.update_norm_bound)
                except Exception as rejected:  # a bad update is rejected, never the run
                    error = rejected
            if error is not None:
                faults.append(self._fault(rnd, plan.client, error))
                continue
            stats = result.stats
            timer["train"] += stats.seconds
            timer["prepare"] += max(result.seconds - stats.seconds, 0.0)
            updates.append(result.update)
            losses.append(stats.loss)
            rows.append({**self._client_costs(plan, result.update, stats, planned.global_delta), **result.wire})
        start = time.perf_counter()
        aggregated = self.strategy.aggregate(rnd, updates) if updates else None
        if aggregated is not None and aggregated.base_update is not None:
            merge_into_base(self.model, aggregated.base_update)
        timer["aggregate"] = time.perf_counter() - start
        record = {
            "method": self.method,
            "round": rnd + 1,
            "clients": planned.clients,
            "ranks": [len(next(iter(u.trained.values()))) for u in updates],
            "train_loss": float(np.average(losses, weights=[u.num_examples for u in updates])) if updates else None,
            "agg_noise": self._aggregation_noise(aggregated, updates) if updates else None,
            "server_flops": aggregated.server_flops if aggregated else 0.0,
            **_mean_costs(rows),
            "faults": faults,
        }
        if (rnd + 1) % tcfg.eval_every == 0 or rnd + 1 == self.config.federation.rounds:
            start = time.perf_counter()
            record.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            timer["evaluate"] = time.perf_counter() - start
        record.update({f"time_{k}_s": v for k, v in timer.items()})
        record["peak_memory_bytes"] = peak_memory_bytes(self.device)
        record["peak_memory_kind"] = "cuda_max_allocated" if self.device.type == "cuda" else "process_max_rss"
        if aggregated is not None and aggregated.info:
            record["info"] = aggregated.info
        self.records.append(record)
        return record

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

    def checkpoint(self) -> Checkpoint:
        """The state after the rounds done so far (strategy, RNGs, records)."""
        tensors, meta = self.strategy.state()
        return Checkpoint(self.method, self.rounds_done, tensors, meta, capture_rng(), self.records)

    def _fault(self, rnd: int, client: int, error: Exception) -> dict:
        """The log entry of a dropped client (its fit raised) or a rejected update (validation failed)."""
        stage = "validate" if isinstance(error, RejectedUpdate) else "fit"
        reason = str(error) if stage == "validate" else f"{type(error).__name__}: {error}"
        what = "update rejected" if stage == "validate" else "dropped"
        log.warning("%s round %d: client %d %s: %s", self.method, rnd + 1, client, what, reason)
        if self.device.type == "cuda" and isinstance(error, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return {"client": client, "stage": stage, "reason": reason}

    def _client_costs(self, plan: ClientPlan, update: ClientUpdate, stats: TrainStats, global_delta) -> dict:
        """One client's traffic, trainable parameters, FLOPs and initialisation noise."""
        trainable = self.head_params + sum(len(update.trained[n]) * (n_out + k_in) for n, (n_out, k_in) in self.shapes.items())
        fold = plan.client_flops
        for name, (n_out, k_in) in self.shapes.items():
            folded = torch.ones(plan.adapter[name].b.shape[1], dtype=torch.bool)
            folded[plan.trained[name].cpu()] = False
            live = int((plan.adapter[name].b.cpu()[:, folded] != 0).any(0).sum())
            fold += costs.fold_flops(n_out, k_in, live) if self.fold_mode == "merge" else 0.0
        down, up = costs.payload_bytes(plan.download), costs.payload_bytes(update.upload())
        return {
            "bytes_down_bf16": down["bf16"],
            "bytes_down_fp32": down["fp32"],
            "bytes_up_bf16": up["bf16"],
            "bytes_up_fp32": up["fp32"],
            "trainable_params": trainable,
            "train_flops": costs.training_flops(stats.tokens, self.frozen_params, trainable),
            "fold_flops": fold,
            "init_noise": costs.initialisation_noise(_deltas(plan.adapter), global_delta),
        }

    def _aggregation_noise(self, aggregated, updates: list[ClientUpdate]) -> float | None:
        """Noise of the new global update against ``Σ p_i ΔW_i`` with data-size weights ``p_i``."""
        sizes = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights = (sizes / sizes.sum()).tolist()
        ideal = {n: sum(w * u.delta(n) for w, u in zip(weights, updates)) for n in self.shapes}
        result = {n: self.strategy.global_delta(n) for n in self.shapes}
        if aggregated.base_update is not None:
            for name, (a, b) in aggregated.base_update.items():
                result[name] = result[name] + b.float() @ a.float()
        return costs.aggregation_noise(result, ideal)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA allocation since the last reset, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _deltas(adapter) -> dict[str, torch.Tensor]:
    return {n: b.float() @ a.float() for n, (a, b) in adapter.items()}


#: Per-client cost fields averaged over the accepted clients of a round.
MEAN_KEYS = ("bytes_down_bf16", "bytes_down_fp32", "bytes_up_bf16", "bytes_up_fp32", "trainable_params")


def _mean_costs(rows: list[dict]) -> dict:
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
