"""inject / select_and_fold / unfold on tiny BERT, Llama, OPT and Qwen2 models, and a training step."""

import pytest
import torch
from helpers import MODELS, randomize_adapters, tiny_model, token_batch

from fed_plora import plora


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_inject_targets_freezes_and_keeps_outputs(kind):
    model = tiny_model(kind)
    ids = token_batch()
    before = _logits(model, ids)
    extra = ["classifier"] if kind == "bert" else []
    plora.inject(model, plora.PLoRAConfig(r=4, alpha=8, target_modules=MODELS[kind][1], modules_to_save=extra))
    layers = plora.plora_layers(model)
    assert len(layers) == len(MODELS[kind][1])
    assert all(layer.scale == 2.0 for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{n}.{p}" for n in layers for p in ("lora_a", "lora_b")}
    expected |= {f"classifier.{p}" for p in ("weight", "bias")} if extra else set()
    assert trainable == expected
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-5, atol=1e-5)  # B = 0: identity


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("mode", ["merge", "exact"])
def test_select_and_fold_keeps_the_function_and_unfold_restores(kind, mode):
    model = tiny_model(kind)
    plora.inject(model, plora.PLoRAConfig(r=8, alpha=16, target_modules=MODELS[kind][1]))
    randomize_adapters(model)
    ids = token_batch()
    before = _logits(model, ids)
    bases = {n: layer.base_layer.weight.detach().clone() for n, layer in plora.plora_layers(model).items()}
    names = list(bases)
    per_layer = {n: [i % 8, (i + 3) % 8] for i, n in enumerate(names)}
    plora.select_and_fold(model, per_layer, mode=mode)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-5)
    plora.unfold(model)
    torch.testing.assert_close(_logits(model, ids), before, rtol=1e-4, atol=1e-5)
    for n, layer in plora.plora_layers(model).items():
        tol = 0 if mode == "exact" else 1e-6
        torch.testing.assert_close(layer.base_layer.weight, bases[n], rtol=0, atol=tol)


def test_training_step_changes_only_selected_modules():
    model = tiny_model("llama")
    plora.inject(model, plora.PLoRAConfig(r=8, alpha=16, target_modules=MODELS["llama"][1]))
    randomize_adapters(model)
    selected = [1, 6]
    plora.select_and_fold(model, selected, mode="exact")
    before = plora.adapter_state_dict(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    assert all(model.get_parameter(n).grad is None for n in frozen)
    optimizer.step()
    assert set(optimizer.state) == set(params)
    assert sum(p.numel() for p in params) == sum(
        2 * (layer.in_features + layer.out_features) for layer in plora.plora_layers(model).values()
    )
    after = plora.adapter_state_dict(model)
    rest = [j for j in range(8) if j not in selected]
    for key, value in after.items():
        rows = (lambda t, idx: t[idx]) if key.endswith("lora_a") else (lambda t, idx: t[:, idx])
        assert torch.equal(rows(value, rest), rows(before[key], rest)), key
        assert not torch.equal(rows(value, selected), rows(before[key], selected)), key
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    plora.unfold(model)
    torch.testing.assert_close(plora.adapter_state_dict(model), after)


def test_target_matching_like_peft_and_errors():
    model = tiny_model("llama")
    plora.inject(model, plora.PLoRAConfig(r=2, target_modules=r".*layers\.0\.self_attn\.(q|v)_proj"))
    assert sorted(n.rsplit(".", 1)[1] for n in plora.plora_layers(model)) == ["q_proj", "v_proj"]
    with pytest.raises(ValueError, match="already"):
        plora.inject(model, plora.PLoRAConfig(r=2, target_modules=["k_proj"]))

    model = tiny_model("llama")
    plora.inject(model, plora.PLoRAConfig(r=2, target_modules="all-linear", alpha_pattern={"mlp": 8.0}))
    layers = plora.plora_layers(model)
    assert len(layers) == 7 and "lm_head" not in layers
    assert layers["model.layers.0.mlp.up_proj"].scale == 4.0 and layers["model.layers.0.self_attn.q_proj"].scale == 8.0

    with pytest.raises(ValueError, match="no nn.Linear"):
        plora.inject(tiny_model("llama"), plora.PLoRAConfig(r=2, target_modules=["nothing"]))
    with pytest.raises(ValueError, match="must name nn.Linear"):
        plora.inject(tiny_model("llama"), plora.PLoRAConfig(r=2, target_modules=["mlp"]))
    with pytest.raises(ValueError, match="modules_to_save"):
        plora.inject(tiny_model("llama"), plora.PLoRAConfig(r=2, target_modules=["q_proj"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="no default target_modules"):
        plora.inject(torch.nn.Sequential(torch.nn.Linear(4, 4)), plora.PLoRAConfig(r=2))
    with pytest.raises(ValueError, match="r must"):
        plora.PLoRAConfig(r=0, target_modules=["q_proj"])
    with pytest.raises(TypeError, match="config"):
        plora.inject(tiny_model("llama"), {"r": 2})


def test_select_and_fold_validates_everything_first():
    model = tiny_model("opt")
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules=["q_proj", "fc1"]))
    names = list(plora.plora_layers(model))
    with pytest.raises(ValueError, match="missing"):
        plora.select_and_fold(model, {names[0]: [0]})
    with pytest.raises(ValueError, match=names[1]):
        plora.select_and_fold(model, {names[0]: [0], names[1]: [9]})
    assert not any(layer.is_selected for layer in plora.plora_layers(model).values())
    with pytest.raises(ValueError, match="no PLoRA"):
        plora.select_and_fold(tiny_model("opt"), [0])
    plora.select_and_fold(model, [0])
    with pytest.raises(RuntimeError, match="unfold first"):
        plora.select_and_fold(model, [1])


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_default_targets_by_model_type(kind):
    config = plora.PLoRAConfig(r=2)
    model = plora.inject(tiny_model(kind), config)
    expected = ["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]
    assert model.plora_config.target_modules == expected and config.target_modules is None
    assert {n.rpartition(".")[2] for n in plora.plora_layers(model)} == set(expected)


def test_merge_into_base_and_snapshot_restore():
    model = tiny_model("llama")
    plora.inject(model, plora.PLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    layers = plora.plora_layers(model)
    gen = torch.Generator().manual_seed(5)
    updates = {
        n: (torch.randn(3, layer.in_features, generator=gen), torch.randn(layer.out_features, 3, generator=gen))
        for n, layer in layers.items()
    }
    before = {n: layer.base_layer.weight.detach().clone() for n, layer in layers.items()}
    saved = plora.snapshot_bases(model)
    bad = {**updates, next(iter(layers)): (torch.randn(3, 1), torch.randn(1, 3))}
    with pytest.raises(ValueError, match="merge needs"):
        plora.merge_into_base(model, bad)
    with pytest.raises(KeyError, match="no PLoRA layer"):
        plora.merge_into_base(model, {"nothing": updates[next(iter(layers))]})
    assert all(torch.equal(layer.base_layer.weight, before[n]) for n, layer in layers.items())  # checked before any change
    plora.merge_into_base(model, updates)
    for name, layer in layers.items():
        a, b = updates[name]
        torch.testing.assert_close(layer.base_layer.weight, before[name] + layer.scale * (b @ a), rtol=1e-6, atol=1e-6)
    plora.restore_bases(model, saved)
    assert all(torch.equal(layer.base_layer.weight, before[n]) for n, layer in layers.items())
    plora.select_and_fold(model, [0])
    with pytest.raises(RuntimeError, match="selection is in force"):
        plora.merge_into_base(model, updates)
