"""Local training (schedules, warm-up, SGD), the baselines as their authors run them, the
reference rows, the logit-adjusted loss, and Fed-PLoRA = FedIT when every client holds the full rank."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import needs_data, read_jsonl, simulated, tiny_config

from fed_plora.fl.config import ConfigError, load_config
from fed_plora.fl.rounds.checkpoint import load_checkpoint
from fed_plora.fl.rounds.client import log_prior, train_local
from fed_plora.fl.rounds.schedule import round_lr
from fed_plora.fl.strategies import Factors, build_strategy
from fed_plora.fl.strategies.base import ClientUpdate

N, K, R = 6, 5, 4


def test_cosine_schedule_runs_from_lr_to_lr_min_over_the_rounds():
    config = load_config(None, ["train.lr=0.01", "train.lr_min=0.001", 'train.lr_schedule="cosine"', "federation.rounds=5"])
    lrs = [round_lr(config, r) for r in range(5)]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.001)
    assert lrs[2] == pytest.approx(0.0055)
    assert all(a > b for a, b in itertools.pairwise(lrs))
    constant = load_config(None, ["train.lr=0.01", "federation.rounds=5", 'train.lr_schedule="constant"'])
    assert {round_lr(constant, r) for r in range(5)} == {0.01}


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.lr_min=1.0", "train.lr_min"),
        ('train.optimizer="adam"', "train.optimizer"),
        ("train.momentum=0.9", "train.momentum"),  # adamw ignores it: refused, not silently dropped
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ('train.lr_schedule="linear"', "train.lr_schedule"),
        ('references.names=["oracle"]', "references.names"),
        ("methods.hetlora.prune_lambda=-1", "prune_lambda"),
        ('methods.flexlora.scale="alpha"', "scale"),
        ('methods.fedplora.module_mean="all"', "module_mean"),
        ("train.logit_adjustment=1", "train.logit_adjustment"),
    ],
)
def test_bad_training_settings_are_refused_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


class _Wrapped(torch.nn.Module):
    """A model with the ``model(**batch).loss`` interface of a transformers model."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, labels, attention_mask=None):
        out = type("Out", (), {})()
        out.loss = ((self.inner(input_ids.float()) - labels.float()) ** 2).mean()
        return out


def _features(count: int = 8):
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randn(3, generator=generator).tolist(), "labels": [1.0]} for _ in range(count)]


def _step_sizes(**settings) -> list[float]:
    torch.manual_seed(0)
    weights = [_Wrapped(torch.nn.Linear(3, 1, bias=False)).inner.weight.detach().clone()]
    for steps in range(1, 5):
        torch.manual_seed(0)
        fresh = _Wrapped(torch.nn.Linear(3, 1, bias=False))
        train_local(fresh, _features(), steps=steps, batch_size=2, weight_decay=0.0, seed=1, pad_id=0, **settings)
        weights.append(fresh.inner.weight.detach().clone())
    return [float((b - a).norm()) for a, b in itertools.pairwise(weights)]


def test_warmup_ramps_the_first_steps_and_sgd_differs_from_adamw():
    plain = _step_sizes(lr=0.1)
    warm = _step_sizes(lr=0.1, warmup_steps=3)
    assert warm[0] == pytest.approx(plain[0] / 4, rel=1e-4)  # lr · 1/(3+1) at the first step
    sgd = _step_sizes(lr=0.1, optimizer="sgd", momentum=0.9)
    assert not math.isclose(sgd[0], plain[0], rel_tol=1e-3)
    assert _step_sizes(lr=0.1, optimizer="sgd", warmup_steps=1)[0] == pytest.approx(sgd[0] / 2, rel=1e-4)


def _update(client: int, rank: int, a: torch.Tensor, b: torch.Tensor, size: int = 1) -> ClientUpdate:
    return ClientUpdate(client, size, {"layer": Factors(a, b)}, {"layer": torch.arange(rank)}, {})


def _adapter():
    generator = torch.Generator().manual_seed(3)
    return {"layer": Factors(torch.randn(R, K, generator=generator), torch.randn(N, R, generator=generator))}


def test_flexlora_rank_scale_hands_out_the_global_update_and_sums_updates_at_their_own_scale():
    common = build_strategy("flexlora", _adapter(), {})
    ranked = build_strategy("flexlora", _adapter(), {}, scale="rank")
    plan = ranked.configure_client(0, 0, 2)
    assert plan.local == {"scale": R / 2} and common.configure_client(0, 0, 2).local == {}
    start = plan.adapter["layer"]
    g = ranked.adapter["layer"]
    torch.testing.assert_close((R / 2) * start.b[:, :2] @ start.a[:2], g.b[:, :2] @ g.a[:2])  # the model starts at the global
    torch.testing.assert_close(plan.download["layer.b"], start.b[:, :2])
    generator = torch.Generator().manual_seed(4)
    a1, b1 = torch.randn(R, K, generator=generator), torch.randn(N, R, generator=generator)
    a2, b2 = torch.randn(R, K, generator=generator), torch.randn(N, R, generator=generator)
    b1[:, 1:], a1[1:] = 0, 0
    ranked.aggregate(0, [_update(0, 1, a1, b1), _update(1, 4, a2, b2)])
    expected = 0.5 * (R / 1) * (b1 @ a1) + 0.5 * (R / 4) * (b2 @ a2)
    torch.testing.assert_close(ranked.global_factors("layer").delta(), expected, rtol=1e-5, atol=1e-5)


def test_hetlora_sends_its_regulariser_and_prunes_on_the_tail_norm_product():
    s = build_strategy("hetlora", _adapter(), {}, prune_gamma=0.5, prune_lambda=0.1)
    assert s.configure_client(0, 0, 4).local == {"tail_penalty": [2, 4, 0.1]}
    assert s.configure_client(0, 1, 1).local == {}  # rank 1 has no tail
    assert build_strategy("hetlora", _adapter(), {}).configure_client(0, 0, 4).local == {}  # pruning off: no regulariser
    a, b = torch.ones(R, K), torch.ones(N, R)
    s.aggregate(0, [_update(0, 4, a, b)])
    a2, b2 = a.clone(), b.clone()
    b2[:, 2:] *= 0.5  # the tail shrank
    s.aggregate(1, [_update(0, 4, a2, b2)])
    assert s.pruned_rank == {0: 2}
    assert s.configure_client(2, 0, 4).local == {"tail_penalty": [1, 2, 0.1]}  # its new tail: modules [1, 2)
    assert s.configure_client(2, 0, 4).trained["layer"].tolist() == [0, 1]


@needs_data
def test_tail_penalty_enters_the_local_loss_and_shrinks_the_tail(tiny_models, tmp_path):
    base = ['methods.names=["hetlora"]', "methods.hetlora.prune_gamma=0.5", "federation.rounds=1", "train.local_steps=3"]
    norms = {}
    for weight in (0.0, 50.0):
        config = tiny_config(
            tiny_models, tmp_path, *base, f"methods.hetlora.prune_lambda={weight}", "federation.rank_choices=[4]"
        )
        directory = simulated(config, f"lambda{weight}")
        state = load_checkpoint(directory / "checkpoints", "hetlora").tensors
        norms[weight] = sum(float(t[:, 2:].norm()) for k, t in state.items() if k.endswith(".b"))
    assert norms[50.0] < norms[0.0]


@needs_data
def test_fedplora_equals_fedit_when_every_client_holds_the_full_rank(tiny_models, tmp_path):
    config = tiny_config(
        tiny_models, tmp_path, 'methods.names=["fedplora", "fedit"]', "federation.rank_choices=[4]", "train.local_steps=2"
    )
    directory = simulated(config, "homogeneous")
    ours, fedit = (load_checkpoint(directory / "checkpoints", m) for m in ("fedplora", "fedit"))
    for key, tensor in ours.tensors.items():
        torch.testing.assert_close(tensor, fedit.tensors[key], rtol=1e-5, atol=1e-6)
    records = {m: [r for r in read_jsonl(directory / "metrics.jsonl") if r["method"] == m] for m in ("fedplora", "fedit")}
    for mine, theirs in zip(records["fedplora"], records["fedit"]):
        assert mine["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-5)
        assert mine.get("eval_matthews") == pytest.approx(theirs.get("eval_matthews"), abs=1e-6)


@needs_data
def test_reference_rows_are_recorded_checkpointed_and_not_rerun(tiny_models, tmp_path):
    config = tiny_config(
        tiny_models, tmp_path, 'methods.names=["fedplora"]', 'references.names=["untrained", "majority", "centralised", "local"]'
    )
    directory = simulated(config, "refs")
    records = read_jsonl(directory / "metrics.jsonl")
    by = {m: [r for r in records if r["method"] == m] for m in ("untrained", "majority", "centralised", "local")}
    for name, rows in by.items():
        assert [r["round"] for r in rows] == [1, 2], name
        assert "eval_matthews" in rows[-1] and "eval_accuracy" in rows[-1], name
        assert all(r["bytes_up_bf16"] is None for r in rows), name  # no traffic
    assert by["centralised"][0]["train_flops"] > 0 and by["local"][-1]["train_flops"] > 0
    assert len(by["local"][-1]["local_matthews"]) == 3  # every client's own model
    assert by["majority"][-1]["eval_matthews"] == 0.0
    summary = (directory / "summary.md").read_text()
    assert all(name in summary for name in by)
    stamp = (directory / "checkpoints" / "centralised.json").stat().st_mtime_ns
    from fed_plora.fl.run.experiment import resume_experiment

    resume_experiment(directory, progress=False)
    assert (directory / "checkpoints" / "centralised.json").stat().st_mtime_ns == stamp
    assert read_jsonl(directory / "metrics.jsonl") == records


@needs_data
def test_a_run_whose_targets_hit_a_module_trained_in_full_is_refused_before_writing(tiny_models, tmp_path):
    from fed_plora.fl.run.experiment import run_experiment

    config = tiny_config(
        tiny_models, tmp_path, 'model.target_modules=["dense"]', 'model.extra_trainable=["bert.pooler", "classifier"]'
    )
    config.run.name = "pooler"
    with pytest.raises(ConfigError, match=r"bert\.pooler\.dense"):
        run_experiment(config, progress=False)
    assert not (tmp_path / "pooler").exists()


def test_length_grouped_passes_cover_every_example_once_in_batches_of_similar_length():
    from fed_plora.fl.rounds.client import pass_order

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (1003,), generator=generator).tolist()
    order = pass_order(1003, 8, generator, lengths)
    assert sorted(order) == list(range(1003))
    batches = [order[k : k + 8] for k in range(0, 1000, 8)]
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 5  # random batches of 8 spread ~45
    firsts = {tuple(pass_order(1003, 8, torch.Generator().manual_seed(s), lengths)[:8]) for s in range(20)}
    assert len(firsts) == 20  # the first batch of a round is not always the same (or the longest)


def test_a_config_written_before_the_new_fields_reads_back_with_the_recipe_it_ran():
    from fed_plora.fl.config import ADDED, Config

    old = Config().to_dict()
    for dotted in ADDED:
        table, *path = dotted.split(".")
        parent = old[table]
        for key in path[:-1]:
            parent = parent[key]
        del parent[path[-1]]
    read = Config.from_dict(old).to_dict()
    assert read["train"]["lr_schedule"] == "constant" and read["references"]["names"] == []
    assert read["methods"]["hetlora"]["prune_lambda"] == 0.0
    assert read["methods"]["fedplora"]["module_mean"] == "holders" and read["train"]["logit_adjustment"] is False
    assert Config.from_dict(Config().to_dict()).train.lr_schedule == "cosine"  # a config that has them keeps them


class _Classifier(torch.nn.Module):
    """A two-class linear classifier with the ``model(**batch)`` interface (``.loss``, ``.logits``, ``.config``)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 2)
        self.config = type("Config", (), {"num_labels": 2})()

    def forward(self, input_ids, attention_mask=None, labels=None):
        out = type("Out", (), {})()
        out.logits = self.linear(input_ids.float())
        if labels is not None:
            out.loss = torch.nn.functional.cross_entropy(out.logits, labels)
        return out


def test_log_prior_counts_every_class_plus_one():
    features = [{"labels": 0}] * 7 + [{"labels": 1}]
    torch.testing.assert_close(log_prior(features, 3), torch.tensor([8 / 11, 2 / 11, 1 / 11]).log())
    with pytest.raises(ValueError, match="class labels"):
        log_prior([{"labels": 5}], 2)


def test_logit_adjustment_keeps_a_one_class_client_from_pushing_the_model_to_its_class():
    """A client whose examples are 95% class 0: plain cross-entropy moves the model's own prediction to class 0;
    the logit-adjusted loss leaves the class balance to the prior and barely moves it."""
    generator = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randn(3, generator=generator).tolist(), "labels": int(i % 20 == 0)} for i in range(200)]
    probe = torch.randn(100, 3, generator=generator)
    shares = {}
    for adjust in (False, True):
        torch.manual_seed(0)
        model = _Classifier()
        train_local(
            model, features, steps=40, batch_size=20, lr=0.05, weight_decay=0.0, seed=1, pad_id=0, logit_adjustment=adjust
        )
        with torch.no_grad():
            shares[adjust] = float((model(probe).logits.argmax(-1) == 0).float().mean())
    assert shares[False] > 0.95
    assert shares[True] < 0.8


def test_logit_adjustment_on_a_generation_task_is_refused():
    with pytest.raises(ConfigError, match=r"train\.logit_adjustment"):
        load_config(None, ['task.name="gsm8k"', "train.logit_adjustment=true"])


@needs_data
def test_logit_adjustment_reaches_every_client_of_a_run(tiny_models, tmp_path):
    """Set in the config, the adjusted loss is what the clients train on (their reported losses differ from a
    plain run's from the first round, where both start from the same model)."""
    losses = {}
    for adjust in ("false", "true"):
        config = tiny_config(tiny_models, tmp_path, 'methods.names=["fedplora"]', f"train.logit_adjustment={adjust}")
        records = read_jsonl(simulated(config, f"adjust-{adjust}") / "metrics.jsonl")
        losses[adjust] = [r["train_loss"] for r in records]
    assert losses["true"][0] != pytest.approx(losses["false"][0], rel=1e-6)
