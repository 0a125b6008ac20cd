"""PLoRA models in the transformers Trainer, with gradient checkpointing, bf16 autocast and 4-bit bases."""

import pytest
import torch
from helpers import MODELS, randomize_adapters, tiny_model, token_batch
from torch import nn

from fed_plora import plora


def _dataset(n=4):
    ids = token_batch(batch=n, length=8, seed=7)
    return [{"input_ids": row, "labels": row} for row in ids]


@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_with_gradient_checkpointing(tmp_path, bf16):
    from transformers import Trainer, TrainingArguments

    model = tiny_model("llama")
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules=MODELS["llama"][1]))
    randomize_adapters(model)
    plora.select_and_fold(model, [0, 3])
    before = plora.adapter_state_dict(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        gradient_checkpointing=True,
        bf16=bf16,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=_dataset()).train()
    after = plora.adapter_state_dict(model)
    for key in before:
        rows = (lambda t: t[[1, 2]]) if key.endswith("lora_a") else (lambda t: t[:, [1, 2]])
        assert torch.equal(rows(after[key]), rows(before[key])), key
    assert any(not torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("quant_type", ["fp4", "nf4"])
def test_4bit_model_trains_with_gradient_checkpointing(quant_type):
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            quantized = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=False, compute_dtype=torch.float32, quant_type=quant_type
            )
            quantized.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.model.layers.get_submodule(parent), child, quantized.to("cpu"))
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules=MODELS["llama"][1]))
    randomize_adapters(model)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    model.train()
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    layers = plora.plora_layers(model)
    assert all(layer.is_4bit and layer.lora_a.grad.abs().sum() > 0 for layer in layers.values())
    plora.select_and_fold(model, [1])  # 4-bit default: exact, the other modules frozen terms
    model(ids, labels=ids).loss.backward()
    assert all(layer.selected_a.grad.abs().sum() > 0 and layer.selected_b.grad.abs().sum() > 0 for layer in layers.values())


def test_torch_compiled_model_gives_eager_logits_and_adapter_gradients():
    """torch.compile with default options (graph breaks allowed) on a model with PLoRA layers: eager's logits,
    and gradients reach every adapter. The fused op runs inside the graph as its custom op; one graph
    (fullgraph) and bit-level equality are tests/test_compile.py's."""
    model = tiny_model("llama")
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules=["q_proj", "down_proj"]))
    randomize_adapters(model)
    ids = token_batch()
    expected = model(ids).logits
    compiled = torch.compile(model, backend="aot_eager")
    logits = compiled(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    logits.sum().backward()
    assert all(layer.lora_a.grad is not None for layer in plora.plora_layers(model).values())
