"""Tiny random transformers models for the PLoRA tests (no weights are downloaded)."""

from __future__ import annotations

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

VOCAB = 64

#: name -> (builder, PEFT-style target names of its attention and MLP projections)
MODELS = {
    "bert": (
        lambda: BertForSequenceClassification(
            BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=32, num_labels=3)
        ),
        ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    ),
    "llama": (
        lambda: LlamaForCausalLM(
            LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
        ),
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    "opt": (
        lambda: OPTForCausalLM(
            OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=2,
                      max_position_embeddings=32, word_embed_proj_dim=32)
        ),
        ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    ),
    "qwen2": (
        lambda: Qwen2ForCausalLM(
            Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
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
    import plora

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in plora.plora_layers(model).values():
            layer.lora_b.copy_(torch.randn(layer.lora_b.shape, generator=gen) * std)
