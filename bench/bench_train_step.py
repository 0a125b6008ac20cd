"""pytest-benchmark suite: one training step of a Llama model, PLoRA against PEFT LoRA at the same rank.

Run through ``python -m bench.train_step`` (prints the table with PEFT measured in the same run and
the ratios, writes the JSON), or directly:
``python -m pytest bench/bench_train_step.py --benchmark-json=out.json``.

A step is ``zero_grad``, forward with labels, backward and an AdamW step, on a Llama-architecture
model built from a config with random weights: Llama-3.2-1B dimensions (16 layers) and one decoder
layer of Llama-2-7B dimensions. Every attention and MLP projection is adapted (rank ``r``,
``alpha = 2r``, fp32 master adapters for both libraries: PEFT's default on 16-bit bases). The base is
bf16, or NF4 (bitsandbytes ``Linear4bit``, bf16 compute). Each timed call ends with a CUDA
synchronisation; ``extra_info`` also holds the CUDA-event median, the peak memory of one step above
what was allocated before it, and the loss of the first step (both libraries start from the same
weights with ``B = 0``, so their first losses must agree).
"""

from __future__ import annotations

import os

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import bench_device, median_ms, on_gpu, peak_memory_bytes, synced
from fed_plora import plora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

MODELS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-7b-1layer": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=128),
}  # fmt: skip

if on_gpu():
    MODEL_NAMES, RANKS, BATCH, SEQ = ("llama-3.2-1b", "llama-7b-1layer"), (16, 32, 64), 4, 1024
    ROUNDS, WARMUP = 10, 3
else:  # smoke configuration through the Triton interpreter
    MODEL_NAMES, RANKS, BATCH, SEQ = ("smoke",), (8,), 2, 16
    ROUNDS, WARMUP = 3, 1

PRECISIONS = ("bf16", "4bit")
LIBRARIES = ("plora", "peft")
CASES = [(m, p, r, lib) for m in MODEL_NAMES for p in PRECISIONS for r in RANKS for lib in LIBRARIES]


def build_model(name: str, precision: str, device: torch.device) -> nn.Module:
    """Random-weight Llama (same seed for every case), bf16, decoder projections NF4 for ``"4bit"``."""
    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=max(SEQ, 128), **MODELS[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device if precision == "bf16" else "cpu"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if precision == "4bit":
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for child_name, linear in list(layer.named_modules()):
                if isinstance(linear, nn.Linear):
                    quantized = bnb.nn.Linear4bit(
                        linear.in_features, linear.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
                    )
                    quantized.load_state_dict(linear.state_dict())
                    parent, _, attr = child_name.rpartition(".")
                    setattr(layer.get_submodule(parent), attr, quantized)
        model = model.to(device)
    model.config.use_cache = False
    return model.train()


def adapt(model: nn.Module, library: str, rank: int) -> nn.Module:
    if library == "plora":
        config = plora.PLoRAConfig(r=rank, alpha=2 * rank, target_modules=TARGETS, adapter_dtype=torch.float32)
        return plora.inject(model, config)
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, lora_dropout=0.0))


def make_step(model: nn.Module, device: torch.device):
    """The training step to time, and its first loss."""
    gen = torch.Generator(device=device).manual_seed(1)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=gen, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss

    return step, step().item(), sum(p.numel() for p in params)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_train_step(benchmark, case):
    name, precision, rank, library = case
    device = bench_device()
    model = adapt(build_model(name, precision, device), library, rank)
    step, first_loss, trainable = make_step(model, device)
    info = {
        "model": name, "precision": precision, "R": rank, "library": library, "batch": BATCH, "seq": SEQ,
        "tokens": BATCH * SEQ, "trainable_params": trainable, "first_loss": first_loss,
    }  # fmt: skip
    info["median_ms_events"] = median_ms(step) if on_gpu() else None
    info["peak_bytes"] = peak_memory_bytes(step)
    benchmark.extra_info.update(info)
    benchmark.pedantic(synced(step), rounds=ROUNDS, warmup_rounds=WARMUP, iterations=1)
    del model, step
    if on_gpu():
        torch.cuda.empty_cache()
