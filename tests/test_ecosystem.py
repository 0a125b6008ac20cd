"""Our import package ``kernels`` shares its name with Hugging Face's; the ecosystem must not trip on it."""

from __future__ import annotations

from pathlib import Path

import torch

import kernels


def test_kernels_import_is_this_project():
    assert Path(kernels.__file__).resolve().parent == Path(__file__).resolve().parents[1] / "kernels"
    assert not hasattr(kernels, "get_kernel")  # the Hugging Face API that transformers/bitsandbytes look for


def test_transformers_does_not_take_us_for_hf_kernels():
    from transformers.utils import import_utils

    assert import_utils.is_kernels_available() is False


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
