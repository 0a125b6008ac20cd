"""The server of a ``fed-plora`` run: a ``Server`` (``fl.rounds``) with the run's model and measurements.

A ``RunServer`` builds its strategy from the run config over the global model (a backbone with PLoRA
injected here), merges any base update into that model, evaluates it every k rounds, and writes each
round's costs, noise, timings and memory into the record.
"""

from __future__ import annotations

import time

import torch

from fed_plora import plora

from ..config import Config
from ..measures import costs, noise
from ..measures.costs import ParameterCounts, mean_costs
from ..measures.evaluation import evaluate
from ..measures.memory import memory_fields
from ..model import inject_configured, read_adapter, write_adapter
from ..strategies import Adapter, ClientPlan, ClientUpdate, RoundResult, strategy_class
from .checkpoint import Checkpoint
from .schedule import is_evaluated
from .server import RoundOutcome, RoundPlan, Server


class RunServer(Server):
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
        options = getattr(config.methods, method)
        strategy = strategy_class(method).for_run(
            adapter, extra, config.federation.weighting, config.run.seed, options, fed.ranks
        )
        super().__init__(strategy, config, fed.ranks, resume, client_sizes=[len(shard) for shard in fed.shards])
        self.params = ParameterCounts.of(model, extra)
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

    def measure(self, done: RoundOutcome) -> dict:
        """The round's aggregation noise (None when the server did not see the updates) and server FLOPs, its
        clients' costs (means), the evaluation when due (``schedule.is_evaluated``), timings and memory."""
        rows, timer = [], dict(prepare=0.0, train=0.0, aggregate=done.aggregate_seconds, evaluate=0.0)
        for plan, result in done.accepted:
            timer["train"] += result.stats.seconds
            timer["prepare"] += max(result.seconds - result.stats.seconds, 0.0)
            rows.append({**self._client_costs(plan, result.update, result.stats, done.planned.global_update), **result.wire})
        noise_fields = self._aggregation_noise(done.aggregated, done.updates if done.seen else [])
        fields = {
            **noise_fields,
            "server_flops": done.aggregated.server_flops if done.aggregated else 0.0,
            **mean_costs(rows),
        }
        if is_evaluated(self.config, done.planned.rnd):
            start = time.perf_counter()
            fields.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            timer["evaluate"] = time.perf_counter() - start
        fields.update({f"time_{k}_s": v for k, v in timer.items()})
        return {**fields, **memory_fields(self.device)}

    def on_aggregated(self, aggregated: RoundResult) -> None:
        """Any base update of the round merged into the global model for good (FLoRA)."""
        if aggregated.base_update is not None:
            plora.merge_into_base(self.model, aggregated.base_update)

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
        """One client's traffic (with privacy, also what it would send in sum form), trainable parameters, FLOPs
        and initialisation noise."""
        trainable, train_flops = self.params.training(update, stats.tokens)
        fold = plan.client_flops
        for name, (n_out, k_in) in self.shapes.items():
            folded = torch.ones(plan.adapter[name].b.shape[1], dtype=torch.bool)
            folded[plan.trained[name].cpu()] = False
            live = int((plan.adapter[name].b.cpu()[:, folded] != 0).any(0).sum())
            fold += costs.fold_flops(n_out, k_in, live) if plan.fold_mode == "merge" else 0.0
        down, up = costs.payload_bytes(plan.download), costs.payload_bytes(update.upload())
        summed = {}
        if self.privacy is not None:  # in sum form a client sends all R modules of a layer, zero-filled
            full = {f"{n}.{part}": t for n, f in plan.adapter.items() for part, t in zip("ab", f)}
            summed["bytes_up_sum_bf16"] = costs.payload_bytes({**full, **plan.extra})["bf16"]
        return {
            **summed,
            "bytes_down_bf16": down["bf16"],
            "bytes_down_fp32": down["fp32"],
            "bytes_up_bf16": up["bf16"],
            "bytes_up_fp32": up["fp32"],
            "trainable_params": trainable,
            "train_flops": train_flops,
            "fold_flops": fold,
            "init_noise": noise.initialisation_noise((plan.adapter[n], global_update[n]) for n in self.shapes),
        }

    def _aggregation_noise(self, aggregated: RoundResult | None, updates: list[ClientUpdate]) -> dict:
        """The new global update's noise against ``Σ p_i ΔW_i`` (``agg_noise``) and against each module's
        product averaged over its trainers (``agg_noise_modules``), data-size weights ``p_i``; None without updates."""
        if not updates:
            return {"agg_noise": None, "agg_noise_modules": None}
        sizes = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
        weights = (sizes / sizes.sum()).tolist()
        measure = lambda ideal: noise.round_aggregation_noise(self.strategy, aggregated.base_update, updates, weights, ideal)
        return {"agg_noise": measure(noise.clients_ideal), "agg_noise_modules": measure(noise.module_ideal)}
