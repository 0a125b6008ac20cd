"""Adapter state dicts and safetensors files: round trips, key and shape validation."""

import pytest
import torch
from helpers import randomize_adapters, tiny_model, token_batch

from fed_plora import plora


def _model(seed=0, extra=("classifier",)):
    model = tiny_model("bert", seed=0)
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules=["query", "value"], modules_to_save=list(extra)))
    randomize_adapters(model, seed=seed)
    return model


def test_state_dict_keys_and_round_trip_through_safetensors(tmp_path):
    source = _model(seed=5)
    state = plora.adapter_state_dict(source)
    layer = "bert.encoder.layer.0.attention.self.query"
    assert state[f"{layer}.lora_a"].shape == (4, 32) and state[f"{layer}.lora_b"].shape == (32, 4)
    assert {"classifier.weight", "classifier.bias"} <= set(state) and len(state) == 6
    path = tmp_path / "adapter.safetensors"
    plora.save_adapter(source, path)
    target = _model(seed=6)
    assert plora.load_adapter(target, path) == ([], [])
    torch.testing.assert_close(plora.adapter_state_dict(target), state, rtol=0, atol=0)
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, source(ids).logits)


def test_load_validates_keys_and_shapes_before_writing():
    model = _model()
    state = plora.adapter_state_dict(model)
    reference = {k: v.clone() for k, v in state.items()}
    key = next(k for k in state if k.endswith("lora_b"))
    with pytest.raises(ValueError, match="missing keys"):
        plora.load_adapter_state_dict(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="unexpected keys.*stray"):
        plora.load_adapter_state_dict(model, {**state, "stray.lora_a": state[key]})
    bad = {k: (torch.zeros(3, 3) if k == key else v + 1) for k, v in state.items()}
    with pytest.raises(ValueError, match=f"{key}.*shape"):
        plora.load_adapter_state_dict(model, bad)
    with pytest.raises(TypeError, match="torch.Tensor"):
        plora.load_adapter_state_dict(model, {**state, key: [0.0]})
    with pytest.raises(TypeError, match=f"{key}.*must be a floating-point tensor .module values., got torch.int32"):
        plora.load_adapter_state_dict(model, {**state, key: state[key].int()})
    torch.testing.assert_close(plora.adapter_state_dict(model), reference, rtol=0, atol=0)
    missing, unexpected = plora.load_adapter_state_dict(model, {key: state[key] * 2, "stray": state[key]}, strict=False)
    assert unexpected == ["stray"] and key not in missing and len(missing) == 5
    torch.testing.assert_close(plora.adapter_state_dict(model)[key], state[key] * 2)


def test_load_while_selected_updates_the_trainable_copies_and_refuses_when_folded():
    model = _model()
    state = {k: v + 1 for k, v in plora.adapter_state_dict(model).items()}
    plora.select_and_fold(model, [0, 2], mode="exact")
    plora.load_adapter_state_dict(model, state)
    torch.testing.assert_close(plora.adapter_state_dict(model), state)
    layer = next(iter(plora.plora_layers(model).values()))
    key = next(k for k in state if k.endswith("query.lora_a"))
    torch.testing.assert_close(layer.selected_a.detach(), state[key][[0, 2]])
    plora.unfold(model)
    plora.select_and_fold(model, [0, 2], mode="merge")
    with pytest.raises(RuntimeError, match="unfold"):
        plora.load_adapter_state_dict(model, state)
