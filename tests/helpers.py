"""Shared test helpers: where the repository and its data are, tolerances, tiny random transformers models
(no weights are downloaded), tiny federation configs, and run comparisons. Fixtures live in ``conftest.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from fed_plora.fl.config import load_config
from fed_plora.fl.data import DATA_DIR_ENV
from fed_plora.fl.rounds.checkpoint import load_checkpoint
from fed_plora.fl.run.experiment import run_experiment
from fed_plora.fl.storage import read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The offline task files (layout of shared/data): $FED_PLORA_DATA, else ../shared/data beside the checkout.
DATA = Path(os.environ.get(DATA_DIR_ENV) or REPO_ROOT / ".." / "shared" / "data").resolve()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no local data directory at {DATA} (set {DATA_DIR_ENV})")

#: Relative Frobenius error allowed against a float64 reference, per dtype (``rel_error``): one op ...
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
#: ... a whole model's logits or gradients (errors of every layer add up) ...
MODEL_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 6e-2}
#: ... and elementwise (``torch.testing.assert_close``) for ops over a 4-bit base.
ELEMENTWISE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
#: Fields of a metrics record that are timings or memory, which differ between equal runs.
VOLATILE = ("time_", "peak_memory")


def rel_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """``‖value − reference‖_F / ‖reference‖_F`` in float64; fails on non-finite values."""
    assert torch.isfinite(value).all(), "non-finite values"
    denom = reference.double().norm().clamp_min(1e-30)
    return ((value.double() - reference.double()).norm() / denom).item()


VOCAB = 64

#: name -> (builder, PEFT-style target names of its attention and MLP projections)
MODELS = {
    "bert": (
        lambda: BertForSequenceClassification(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
                num_labels=3,
            )
        ),
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    ),
    "llama": (
        lambda: LlamaForCausalLM(
            LlamaConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
            )
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "opt": (
        lambda: OPTForCausalLM(
            OPTConfig(
                vocab_size=VOCAB,
                hidden_size=32,
                ffn_dim=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                max_position_embeddings=32,
                word_embed_proj_dim=32,
            )
        ),
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    ),
    "qwen2": (
        lambda: Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                max_position_embeddings=32,
            )
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


def tiny_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind][0]().eval()


def token_batch(batch: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize_adapters(model: torch.nn.Module, std: float = 0.2, seed: int = 2) -> None:
    """Give every module a non-zero ``b_j`` so that folding and freezing change something."""
    from fed_plora import plora

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in plora.plora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen) * std)


def tiny_config(tiny_models: Path, tmp_path: Path, *overrides: str):
    """A 2-round federation of 3 clients on the tiny BERT of the ``tiny_models`` fixture and local CoLA."""
    return load_config(
        None,
        [
            f'model.name="{tiny_models / "bert"}"',
            f'task.data_dir="{DATA}"',
            f'run.out_dir="{tmp_path}"',
            "model.rank=4",
            "model.alpha=8.0",
            "task.max_train_examples=48",
            "task.max_eval_examples=8",
            "task.max_length=16",
            "federation.clients=3",
            "federation.fraction=0.67",
            "federation.rounds=2",
            'federation.rank_scheme="cycle"',
            "federation.rank_choices=[1, 2, 4]",
            "train.local_steps=1",
            "train.batch_size=4",
            "train.eval_batch_size=8",
            "references.names=[]",
            *overrides,
        ],
    )


def stable(records: list[dict]) -> list[dict]:
    """Metrics records without their timings and memory."""
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in records]


#: Fields a Flower run logs on top of the simulator's.
FLOWER_KEYS = ("bytes_down_flower", "bytes_up_flower")


def same_run(flower_dir: Path, local_dir: Path, methods) -> None:
    """Every method's final global state and every logged number (times and memory aside) are equal."""
    for method in methods:
        ours, theirs = load_checkpoint(local_dir / "checkpoints", method), load_checkpoint(flower_dir / "checkpoints", method)
        assert ours.tensors.keys() == theirs.tensors.keys()
        for key, tensor in ours.tensors.items():
            assert torch.equal(tensor, theirs.tensors[key]), (method, key)
    flower_records = read_jsonl(flower_dir / "metrics.jsonl")
    without_wire = [{k: v for k, v in r.items() if k not in FLOWER_KEYS} for r in flower_records]
    assert stable(without_wire) == stable(read_jsonl(local_dir / "metrics.jsonl"))


def simulated(config, name: str) -> Path:
    """Run ``config`` in the in-process simulator as run ``name``; its directory."""
    config.run.name = name
    with torch.random.fork_rng():
        directory, _ = run_experiment(config, progress=False)
    return directory


class LaunchRecorder:
    """Wraps a Triton kernel and records, per launch, what Triton specialises a compile on (``skipped_args``:
    the arguments declared ``do_not_specialize``)."""

    def __init__(self, kernel, log: list, skipped_args=()):
        self.kernel, self.log, self.skipped_args = kernel, log, skipped_args
        self.arg_names = kernel.fn.arg_names

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = []
            for name, value in zip(self.arg_names, args):
                if name in self.skipped_args:
                    continue  # declared do_not_specialize
                if isinstance(value, torch.Tensor):
                    key.append((name, value.dtype, value.data_ptr() % 16 == 0))
                elif isinstance(value, bool) or not isinstance(value, int):
                    key.append((name, type(value).__name__))
                else:
                    key.append((name, value == 1, value % 16 == 0))
            key.extend(sorted(kwargs.items()))
            self.log.append((self.kernel.fn.__name__, tuple(key)))
            return self.kernel[grid](*args, **kwargs)

        return launch


def moved_update(plan, size: int, seed: int, scale: float = 1.0):
    """``plan``'s ``ClientUpdate`` of data size ``size``: every trained module (row of ``a``, column of ``b``) and
    the head moved by seeded Gaussian steps of size ``scale``, the other modules as planned."""
    from fed_plora.fl.strategies import ClientUpdate, Factors

    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, (a, b) in plan.adapter.items():
        a, b = a.clone(), b.clone()
        idx = plan.trained[name]
        a[idx] += scale * torch.randn(a[idx].shape, generator=generator)
        b[:, idx] += scale * torch.randn(b[:, idx].shape, generator=generator)
        adapter[name] = Factors(a, b)
    extra = {n: v + scale * torch.randn(v.shape, generator=generator) for n, v in plan.extra.items()}
    return ClientUpdate(plan.client, size, adapter, dict(plan.trained), extra)
