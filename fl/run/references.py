"""Reference rows of a run: what the federated methods are measured against (``[references] names``).

- ``untrained``: the model as loaded, PLoRA injected (its update is zero; the head is fresh);
- ``majority``: the most frequent training label predicted for every evaluation example (classification);
- ``centralised`` (the ceiling): one learner on the pooled training data at the global rank ``R``, seeing as
  many examples as the federation: in round ``t`` it takes as many local steps as the round's sampled
  clients together, at the round's learning rate, evaluated when the methods are;
- ``local`` (the floor): every client alone on its own shard at its own rank, training in exactly the
  rounds the federation samples it (same steps, learning rates and seeds); each client's final model is
  evaluated, and the row reports the mean over clients (``eval_<metric>``) beside every client's score.

Each returns its records in the shape of a method's (``fl.rounds.run_server``), with no traffic.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from ..config import REFERENCES, Config
from ..data import score
from ..measures.costs import ParameterCounts, mean_costs
from ..measures.evaluation import evaluate
from ..measures.memory import memory_fields
from ..model import inject_configured, read_adapter, write_adapter
from ..rounds.client import fit, fit_settings
from ..rounds.schedule import is_evaluated, local_steps, round_clients
from ..strategies import FedIT


def run_reference(
    config: Config,
    name: str,
    fed,
    model: torch.nn.Module,
    tokenizer,
    autocast_dtype: torch.dtype | None,
    on_round: Callable[[dict], None] = lambda record: None,
) -> list[dict]:
    """The records of reference ``name`` on ``model`` (a freshly loaded backbone, PLoRA injected here)."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference {name!r}; choose from {', '.join(REFERENCES)}")
    runner = _Reference(config, name, fed, model, tokenizer, autocast_dtype)
    records = {
        "untrained": runner.untrained,
        "majority": runner.majority,
        "centralised": runner.centralised,
        "local": runner.local,
    }[name]()
    for record in records:
        on_round(record)
    return records


class _Reference:
    def __init__(self, config: Config, name: str, fed, model, tokenizer, autocast_dtype):
        self.config, self.name, self.fed, self.model = config, name, fed, model
        self.tokenizer, self.autocast_dtype = tokenizer, autocast_dtype
        self.device = next(model.parameters()).device
        inject_configured(model, config)
        self.adapter, self.extra = read_adapter(model)
        self.params = ParameterCounts.of(model, self.extra)

    def record(self, rnd: int, **fields) -> dict:
        """A record in the shape of a method's: no traffic, no folding, no aggregation."""
        return {
            "method": self.name,
            "round": rnd + 1,
            "clients": [],
            "ranks": [],
            "train_loss": None,
            "agg_noise": None,
            "agg_noise_modules": None,
            "server_flops": 0.0,
            **mean_costs([]),  # no client sent or folded anything
            "faults": [],
            **fields,
            **memory_fields(self.device),
        }

    def evaluate(self, strategy: FedIT | None = None) -> dict[str, float]:
        if strategy is not None:
            write_adapter(self.model, strategy.global_adapter(), strategy.extra)
        scores = evaluate(
            self.model,
            self.fed.task,
            self.fed.eval,
            self.tokenizer,
            batch_size=self.config.train.eval_batch_size,
            max_new_tokens=self.config.task.max_new_tokens,
            autocast_dtype=self.autocast_dtype,
        )
        return {f"eval_{k}": v for k, v in scores.items()}

    def at_end(self, scores: dict, **fields) -> list[dict]:
        """Records of rounds 1..rounds, nothing done but ``scores`` (and ``fields``) at the last."""
        rounds = self.config.federation.rounds
        return [self.record(rnd) for rnd in range(rounds - 1)] + [self.record(rounds - 1, **scores, **fields)]

    def untrained(self) -> list[dict]:
        start = time.perf_counter()
        scores = self.evaluate()
        return self.at_end(scores, time_evaluate_s=time.perf_counter() - start)

    def majority(self) -> list[dict]:
        task = self.fed.task
        if task.kind != "classification":
            raise ValueError(f"reference 'majority' needs a classification task; {task.name} is {task.kind}")
        label = Counter(f["labels"] for f in self.fed.train).most_common(1)[0][0]
        references = [f["labels"] for f in self.fed.eval]
        scores = score(task.name, [label] * len(references), references, task.metric)
        return self.at_end({f"eval_{k}": v for k, v in scores.items()}, majority_label=label)

    def learner(self, rank: int) -> FedIT:
        """A rank-``rank`` LoRA learner from the run's initial adapter (a one-client FedIT)."""
        return FedIT(self.adapter, self.extra, "data", self.config.run.seed, client_rank=rank)

    def train(self, learner: FedIT, rnd: int, client: int, features: list[dict], steps: int | None = None) -> dict:
        """One round of ``learner`` on ``features`` (``steps``: the client's own by default); its costs."""
        pad = self.tokenizer.pad_token_id
        settings = fit_settings(self.config, rnd, client, len(features), pad, self.autocast_dtype)
        if steps is not None:
            settings["steps"] = steps
        plan = learner.configure_client(rnd, client, learner.options.client_rank)
        update, stats = fit(self.model, plan, features, **settings)
        learner.aggregate(rnd, [update])
        trainable, flops = self.params.training(update, stats.tokens)
        return {"loss": stats.loss, "seconds": stats.seconds, "flops": flops, "trainable": trainable}

    def centralised(self) -> list[dict]:
        fcfg, learner, records = self.config.federation, self.learner(self.config.model.rank), []
        pooled = self.fed.train
        for rnd in range(fcfg.rounds):
            sampled = round_clients(self.config, rnd)
            steps = sum(local_steps(self.config, len(self.fed.shards[c])) for c in sampled)
            done = self.train(learner, rnd, 0, pooled, steps)
            fields = {"train_loss": done["loss"], "train_flops": done["flops"], "trainable_params": done["trainable"]}
            timing = {"time_train_s": done["seconds"]}
            if is_evaluated(self.config, rnd):
                start = time.perf_counter()
                fields.update(self.evaluate(learner))
                timing["time_evaluate_s"] = time.perf_counter() - start
            records.append(self.record(rnd, **fields, **timing))
        return records

    def local(self) -> list[dict]:
        fcfg, metric = self.config.federation, self.fed.task.metric
        learners = {c: self.learner(self.fed.ranks[c]) for c in range(fcfg.clients)}
        records = []
        for rnd in range(fcfg.rounds):
            sampled = round_clients(self.config, rnd)
            done = [self.train(learners[c], rnd, c, self.fed.client_features(c)) for c in sampled]
            sizes = [len(self.fed.shards[c]) for c in sampled]
            fields = {
                "clients": sampled,
                "ranks": [self.fed.ranks[c] for c in sampled],
                "train_loss": float(np.average([d["loss"] for d in done], weights=sizes)),
                "train_flops": sum(d["flops"] for d in done),
                "trainable_params": float(np.mean([d["trainable"] for d in done])),
            }
            timing = {"time_train_s": sum(d["seconds"] for d in done)}
            if rnd + 1 == fcfg.rounds:  # every client's own model, evaluated
                start = time.perf_counter()
                scores = [self.evaluate(learners[c]) for c in range(fcfg.clients)]
                fields.update({k: float(np.mean([s[k] for s in scores])) for k in scores[0]})
                fields[f"local_{metric}"] = [s[f"eval_{metric}"] for s in scores]
                timing["time_evaluate_s"] = time.perf_counter() - start
            records.append(self.record(rnd, **fields, **timing))
        return records
