"""fed-plora beside the libraries it sits with: one distinctive import name (``fed_plora``), Hugging Face's
``kernels`` importable and untouched, and transformers, bitsandbytes and PEFT working in the same environment."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from helpers import DATA, REPO_ROOT, needs_data

LIBRARY = {"kernels": "fed_plora.kernels", "plora": "fed_plora.plora", "fl": "fed_plora.fl"}


def test_every_folder_is_installed_under_fed_plora():
    """pyproject.toml lists exactly the packages in the three folders, each under ``fed_plora``."""
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        setuptools = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools["package-dir"] == {name: folder for folder, name in LIBRARY.items()}
    on_disk = {
        ".".join((LIBRARY[folder], *init.parent.relative_to(REPO_ROOT / folder).parts))
        for folder in LIBRARY
        for init in (REPO_ROOT / folder).rglob("__init__.py")
    }
    assert set(setuptools["packages"]) == on_disk
    installed = {
        line.split(".")[0]
        for line in (importlib.metadata.distribution("fed-plora").read_text("top_level.txt") or "fed_plora").split()
    }
    assert installed <= {"fed_plora"}


def test_hugging_face_kernels_is_theirs_even_from_the_checkout_root():
    """From the checkout's root (on sys.path as the working directory), ``import kernels`` still gives Hugging
    Face's package, and transformers does not take our folder for it."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels is in the test extra")
    code = (
        "import kernels, fed_plora.kernels as ours\n"
        "from transformers.utils import import_utils\n"
        "import_utils.is_kernels_available()\n"
        "assert hasattr(kernels, 'get_kernel'), kernels\n"
        "assert ours.__name__ == 'fed_plora.kernels' and hasattr(ours, 'fold_')\n"
        "print(kernels.__file__)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve().parent != REPO_ROOT / "kernels"


def _console_command() -> str:
    beside = Path(sys.executable).parent / "fed-plora"
    found = str(beside) if beside.exists() else shutil.which("fed-plora")
    if found is None:
        pytest.fail("the fed-plora console command is not installed (pip install -e .)")
    return found


@needs_data
def test_outside_the_checkout_command_transformers_bitsandbytes_and_hf_kernels(tiny_models, tmp_path):
    """From a directory outside the repository, in one environment: a tiny experiment through the console
    command, then in one process Hugging Face's kernels, a transformers model and a PLoRA layer over a
    bitsandbytes 4-bit base."""
    pytest.importorskip("kernels", reason="Hugging Face's kernels is in the test extra")
    pytest.importorskip("bitsandbytes")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    run = [
        _console_command(),
        "run",
        "--task",
        "cola",
        "--methods",
        "fedplora,fedit",
        "--model",
        str(tiny_models / "bert"),
        "--data-dir",
        str(DATA),
        "--rounds",
        "1",
        "--clients",
        "2",
        "--name",
        "tiny",
        "--out-dir",
        str(work / "runs"),
        "--no-progress",
        "--set",
        "task.max_train_examples=16",
        "--set",
        "task.max_eval_examples=8",
        "--set",
        "task.max_length=16",
        "--set",
        "train.local_steps=1",
        "--set",
        "train.batch_size=4",
        "--set",
        "model.rank=4",
        "--set",
        "federation.fraction=1.0",
        "--set",
        "federation.rank_choices=[2, 4]",
    ]
    done = subprocess.run(run, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (work / "runs" / "tiny" / "metrics.jsonl").exists() and "fedplora" in done.stdout
    # A clean first screen: nothing from another package (bitsandbytes is never imported for a float model,
    # so its reach for Hub kernels prints nothing).
    assert done.stderr == "", done.stderr
    imported = (
        "import sys, fed_plora.fl, fed_plora.fl.cli, fed_plora.plora, fed_plora.kernels; print('bitsandbytes' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", imported], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == (0, "False\n", ""), done.stderr
    code = f"""
import kernels, torch, bitsandbytes as bnb
from transformers import AutoModelForSequenceClassification
from fed_plora import plora
assert hasattr(kernels, "get_kernel"), kernels.__file__
model = AutoModelForSequenceClassification.from_pretrained({str(tiny_models / "bert")!r})
plora.inject(model, plora.PLoRAConfig(r=4, target_modules=["query", "value"]))
assert len(plora.plora_layers(model)) == 2
base = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
base.load_state_dict(torch.nn.Linear(64, 32).state_dict())
layer = plora.PLoRALinear(base.to("cpu"), 4, 0.5)
assert layer(torch.randn(3, 64)).shape == (3, 32)
print("ok", kernels.__file__)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok") and str(REPO_ROOT) not in done.stdout


def test_bitsandbytes_transformers_peft_run_a_4bit_model(tmp_path):
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, device_map="cpu")
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)

    x = torch.randn(3, 64)
    dequantised = bnbf.dequantize_4bit(q_proj.weight.data, q_proj.weight.quant_state).float()
    expected = x @ dequantised.T
    # bitsandbytes' CPU path may compute in bf16: compare by relative norm.
    assert ((q_proj(x).float() - expected).norm() / expected.norm()).item() < 1e-2

    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 128, (2, 8))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
