"""End-to-end simulation on tiny random models (Triton interpreter on CPU): every method runs, the
base is restored exactly between clients, runs are deterministic, and the command writes its outputs."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import DATA, needs_data, stable, tiny_config

from fed_plora.fl.cli import main
from fed_plora.fl.config import load_config
from fed_plora.fl.federation import build_federation
from fed_plora.fl.measures.costs import WIRE_BYTES
from fed_plora.fl.model import load_model, load_tokenizer
from fed_plora.fl.rounds.simulate import simulate
from fed_plora.fl.run.experiment import run_experiment
from fed_plora.fl.strategies import STRATEGIES

pytestmark = needs_data


def test_every_method_runs_and_reports(tiny_models, tmp_path):
    config = tiny_config(tiny_models, tmp_path, 'run.name="all"')
    directory, table = run_experiment(config, "test", progress=False)
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == len(STRATEGIES) * 2
    assert all(m in table for m in STRATEGIES)
    assert (directory / "curves.png").stat().st_size > 0 and (directory / "summary.md").is_file()
    clients = json.loads((directory / "clients.json").read_text())
    assert sum(c["examples"] for c in clients) == 48 and [c["rank"] for c in clients] == [1, 2, 4]
    by = {(r["method"], r["round"]): r for r in records}
    for r in by.values():
        assert math.isfinite(r["train_loss"]) and "eval_matthews" in r and r["train_flops"] > 0
    # Zero initialisation noise where the client starts from exactly the global model.
    for method in ("fedplora", "fedit", "flora"):
        assert by[(method, 2)]["init_noise"] == 0.0
    assert by[("hetlora", 2)]["init_noise"] > 0  # truncation
    # FLoRA's stack and FlexLoRA's kept ΔW are the ideal average: no aggregation noise.
    assert by[("flora", 1)]["agg_noise"] < 1e-5 and by[("flexlora", 2)]["agg_noise"] < 1e-5
    assert by[("fedit", 2)]["agg_noise"] > 0
    # Traffic from the tensors sent: Fed-PLoRA sends all R = 4 modules of both adapted 32x32 layers down.
    head = 32 * 2 + 2
    assert by[("fedplora", 1)]["bytes_down_bf16"] == (2 * 4 * (32 + 32) + head) * WIRE_BYTES["bf16"]
    ranks = by[("fedplora", 1)]["ranks"]
    expected_up = np.mean([2 * r * 64 + head for r in ranks]) * WIRE_BYTES["fp32"]
    assert by[("fedplora", 1)]["bytes_up_fp32"] == pytest.approx(expected_up)
    assert by[("fedplora", 1)]["fold_flops"] == 0  # B = 0 in round 1: nothing to fold
    assert by[("fedplora", 2)]["fold_flops"] > 0 and by[("flexlora", 1)]["server_flops"] > 0


def test_base_restored_exactly_and_runs_deterministic(tiny_models, tmp_path):
    config = tiny_config(tiny_models, tmp_path)
    tokenizer = load_tokenizer(config.model.name)
    fed = build_federation(config, tokenizer)
    runs = []
    for _ in range(2):
        model = load_model(config.model.name, fed.task, tokenizer.pad_token_id, 0, torch.device("cpu"), torch.float32)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "classifier" not in n}
        runs.append(stable(simulate(config, "fedplora", fed, model, tokenizer, None)))
        after = {
            n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora" not in n and "classifier" not in n
        }
        for name, value in before.items():
            assert torch.equal(after[name], value), name  # every fold undone bit-exactly
    assert runs[0] == runs[1]
    assert all(len(r["clients"]) == 2 for r in runs[0])  # round(0.67 * 3) clients per round


def test_generation_task_on_a_tiny_causal_lm(tiny_models, tmp_path):
    config = tiny_config(
        tiny_models,
        tmp_path,
        f'model.name="{tiny_models / "llama"}"',
        'task.name="pubmedqa"',
        "task.max_new_tokens=2",
        "task.max_length=48",
        "task.max_eval_examples=4",
        "federation.rounds=1",
        'methods.names=["fedplora"]',
    )
    directory, _ = run_experiment(config, "test", progress=False)
    (record,) = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= record["eval_accuracy"] <= 1.0 and math.isfinite(record["train_loss"])


def test_command_line_and_config_errors(tiny_models, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\nname = "{tiny_models / "bert"}"\nrank = 4\n[federation]\nclients = 2\nfraction = 0.5\n')
    args = [
        "run",
        "--config",
        str(config),
        "--methods",
        "fedit",
        "--rounds",
        "1",
        "--data-dir",
        str(DATA),
        "--out-dir",
        str(tmp_path),
        "--name",
        "cli",
        "--no-progress",
        "--set",
        "task.max_train_examples=16",
        "--set",
        "task.max_eval_examples=4",
        "--set",
        "train.local_steps=1",
        "--set",
        "train.batch_size=4",
        "--set",
        "federation.rank_choices=[2, 4]",
        "--set",
        "references.names=[]",
    ]
    assert main(args) == 0
    assert "| fedit |" in capsys.readouterr().out
    assert (tmp_path / "cli" / "metrics.jsonl").read_text().count("\n") == 1
    with pytest.raises(KeyError, match="unknown key train.steps"):
        load_config(config, ["train.steps=3"])
    with pytest.raises(KeyError, match="unknown section"):
        load_config(None, ["training.lr=1"])
    with pytest.raises(FileNotFoundError, match="config file"):
        load_config(tmp_path / "missing.toml")
