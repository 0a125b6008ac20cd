"""A library call that fails leaves the model as it was: every test plants a fault,
checks the clear error, and compares the model's full state (state_dict and every buffer, module
structure, requires_grad, every PLoRA layer's selection state) before and after."""

import json

import numpy as np
import pytest
import torch
from helpers import randomize_adapters, tiny_model
from torch import nn

from fed_plora import plora
from fed_plora.plora import _base, io, peft_io

BERT_TARGETS = ["query", "value"]


def _everything(model):
    """All a failed call must leave alone, as detached copies."""
    layers = plora.plora_layers(model)
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
        "modules": [(name, type(m).__name__, id(m)) for name, m in model.named_modules()],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "layers": {
            n: (layer.states, layer._mode, layer._pristine is None, layer.selected_a is None, sorted(layer._buffers))
            for n, layer in layers.items()
        },
        "values": {n: layer.module_values() for n, layer in layers.items()},
        "config": model.__dict__.get("plora_config", "none"),
    }


def _assert_unchanged(before, model, base_atol=0.0):
    """``model`` is as ``before`` recorded it; float base weights may differ by ``base_atol`` (a fold undone
    by an unfold without a snapshot rounds twice)."""
    after = _everything(model)
    for key in ("modules", "requires_grad", "layers"):
        assert after[key] == before[key], key
    assert after["config"] is before["config"]
    for group in ("tensors", "buffers"):
        assert after[group].keys() == before[group].keys(), group
        for name, value in before[group].items():
            loose = base_atol and name.endswith("base_layer.weight") and value.is_floating_point()
            if loose:
                torch.testing.assert_close(after[group][name], value, rtol=0, atol=base_atol, msg=name)
            else:
                assert torch.equal(after[group][name], value), name
    for name, (a, b) in before["values"].items():
        assert torch.equal(after["values"][name][0], a) and torch.equal(after["values"][name][1], b), name


def _bert(r=4, extra=("classifier",), seed=0):
    model = tiny_model("bert", seed=seed)
    plora.inject(model, plora.PLoRAConfig(r=r, alpha=2 * r, target_modules=BERT_TARGETS, modules_to_save=list(extra)))
    randomize_adapters(model, seed=seed + 3)
    return model


def _fail_on_call(monkeypatch, owner, name, n, *, after=False):
    """Replace ``owner.name`` by a wrapper that raises on its ``n``-th call (before or after calling through)."""
    real, calls = getattr(owner, name), []

    def planted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n and not after:
            raise RuntimeError("planted failure")
        result = real(*args, **kwargs)
        if len(calls) == n:
            raise RuntimeError("planted failure")
        return result

    monkeypatch.setattr(owner, name, planted)
    return calls


# ------------------------------------------------------------------ config and inject


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_config_refuses_non_finite_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite"):
        plora.PLoRAConfig(alpha=alpha)
    with pytest.raises(ValueError, match=r"alpha_pattern\['mlp'\] must be a finite"):
        plora.PLoRAConfig(alpha_pattern={"mlp": alpha})


@pytest.mark.parametrize("alpha", ["16", None, True, [16.0], torch.tensor(16.0)])
def test_config_refuses_alpha_that_is_not_a_number(alpha):
    with pytest.raises(TypeError, match="alpha must be a finite real number"):
        plora.PLoRAConfig(alpha=alpha)
    with pytest.raises(TypeError, match="alpha_pattern"):
        plora.PLoRAConfig(alpha_pattern={"mlp": alpha})


def test_config_accepts_numbers_of_any_real_type():
    assert plora.PLoRAConfig(r=4, alpha=8).scale_for("x") == 2.0
    assert plora.PLoRAConfig(r=4, alpha=np.float32(8.0), alpha_pattern={"x": np.int64(4)}).scale_for("x") == 1.0
    with pytest.raises(TypeError, match="alpha_pattern keys"):
        plora.PLoRAConfig(alpha_pattern={1: 8.0})


def test_inject_with_a_missing_modules_to_save_changes_nothing_and_can_be_retried():
    model = tiny_model("bert")
    before = _everything(model)
    config = plora.PLoRAConfig(r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier", "no_such_head"])
    with pytest.raises(ValueError, match=r"modules_to_save.*no_such_head"):
        plora.inject(model, config)
    _assert_unchanged(before, model)
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    assert len(plora.plora_layers(model)) == 2


def test_inject_failing_in_the_last_layer_gives_the_model_back(monkeypatch):
    model = tiny_model("bert")
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)  # a flag of the caller's, kept
    before = _everything(model)
    calls = _fail_on_call(monkeypatch, plora.PLoRALinear, "reset_adapter", 2)  # in the 2nd layer's __init__
    with pytest.raises(RuntimeError, match="planted"):
        plora.inject(model, plora.PLoRAConfig(r=4, target_modules=BERT_TARGETS, modules_to_save=["classifier"]))
    assert len(calls) == 2
    _assert_unchanged(before, model)
    # A failure after every layer is in place is undone too: the 5th requires_grad_ call is the first of
    # the freezing loop (the two layers froze their bases' weight and bias).
    monkeypatch.undo()
    calls = _fail_on_call(monkeypatch, nn.Parameter, "requires_grad_", 5, after=True)
    with pytest.raises(RuntimeError, match="planted"):
        plora.inject(model, plora.PLoRAConfig(r=4, target_modules=BERT_TARGETS))
    monkeypatch.undo()
    _assert_unchanged(before, model)


# ------------------------------------------------------------------ select_and_fold / unfold


@pytest.mark.parametrize(
    "bad", [[0.5], [1.0], [True], [np.bool_(True)], [np.float64(1.0)], [torch.tensor(1.0)], [torch.tensor(True)]]
)
def test_float_and_bool_indices_are_type_errors_not_truncated(bad):
    model = _bert()
    before = _everything(model)
    with pytest.raises(TypeError, match="indices must hold integer module indices"):
        plora.select_and_fold(model, bad)
    layer = next(iter(plora.plora_layers(model).values()))
    with pytest.raises(TypeError, match="indices must hold integer module indices"):
        layer.select_and_fold(bad)
    _assert_unchanged(before, model)


@pytest.mark.parametrize("bad", [torch.tensor([True]), torch.tensor([0.0, 1.0]), torch.tensor([0.5]), torch.tensor([1j])])
def test_float_and_bool_index_tensors_are_type_errors(bad):
    model = _bert()
    before = _everything(model)
    with pytest.raises(TypeError, match=f"indices must hold integer module indices, got a {bad.dtype} tensor"):
        plora.select_and_fold(model, bad)
    _assert_unchanged(before, model)


@pytest.mark.parametrize(
    "good", [[np.int64(1), 3], torch.tensor([1, 3]), torch.tensor([3, 1], dtype=torch.int8), [torch.tensor(1), 3], (3, 1)]
)
def test_integer_indices_of_any_kind_select(good):
    model = _bert()
    plora.select_and_fold(model, good)
    assert all(layer.indices("trainable") == [1, 3] for layer in plora.plora_layers(model).values())


def test_per_layer_indices_with_a_bad_last_layer_change_nothing():
    model = _bert()
    names = list(plora.plora_layers(model))
    before = _everything(model)
    for bad, error in (([0.5], TypeError), ([4], ValueError), ([1, 1], ValueError), (None, TypeError)):
        with pytest.raises(error, match=f"layer {names[-1]}: indices"):
            plora.select_and_fold(model, {names[0]: [0], names[-1]: bad}, mode="merge", pristine=True)
        _assert_unchanged(before, model)
    with pytest.raises(ValueError, match="mode"):
        plora.select_and_fold(model, [0], mode="fold")
    _assert_unchanged(before, model)


def test_per_layer_iterators_are_read_once():
    """The checks used to consume an iterator, and the layer then folded every module."""
    model = _bert()
    names = list(plora.plora_layers(model))
    plora.select_and_fold(model, {name: iter([0, 2]) for name in names})
    assert all(layer.indices("trainable") == [0, 2] for layer in plora.plora_layers(model).values())
    plora.unfold(model)
    plora.select_and_fold(model, (j for j in [1]))
    assert all(layer.indices("trainable") == [1] for layer in plora.plora_layers(model).values())


@pytest.mark.parametrize("pristine", [True, False])
def test_select_and_fold_failing_in_the_last_layer_unfolds_the_others(monkeypatch, pristine):
    model = _bert()
    layers = plora.plora_layers(model)
    before = _everything(model)
    # With a snapshot the fold may fail after writing (restored from it); without, a float fold fails on
    # its checks, before writing.
    calls = _fail_on_call(monkeypatch, _base, "fold_", len(layers), after=pristine)
    with pytest.raises(RuntimeError, match="planted"):
        plora.select_and_fold(model, {n: [i] for i, n in enumerate(layers)}, mode="merge", pristine=pristine)
    assert len(calls) == len(layers)
    _assert_unchanged(before, model, base_atol=0.0 if pristine else 1e-6)
    monkeypatch.undo()
    plora.select_and_fold(model, [0], mode="merge", pristine=pristine)  # and a retry works
    assert all(layer.is_selected for layer in layers.values())


def _mixed_llama():
    """A tiny Llama whose v_proj is an NF4 ``Linear4bit``: PLoRA layers q_proj (float), v_proj (NF4), o_proj (float)."""
    bnb = pytest.importorskip("bitsandbytes")
    model = tiny_model("llama")
    attention = model.model.layers[0].self_attn
    dense = attention.v_proj
    nf4 = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    nf4.load_state_dict(dense.state_dict())
    attention.v_proj = nf4.to("cpu")
    plora.inject(model, plora.PLoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_adapters(model)
    assert [layer.is_4bit for layer in plora.plora_layers(model).values()] == [False, True, False]
    return model


@pytest.mark.parametrize("pristine", [True, False])
def test_select_and_fold_with_an_nf4_layer_failing_unfolds_the_others(monkeypatch, pristine):
    model = _mixed_llama()
    before = _everything(model)
    calls = _fail_on_call(monkeypatch, _base, "fold_nf4_", 1, after=True)  # the NF4 fold writes, then fails
    with pytest.raises(RuntimeError, match="planted"):
        plora.select_and_fold(model, [1], mode="merge", pristine=pristine)
    assert len(calls) == 1
    _assert_unchanged(before, model, base_atol=0.0 if pristine else 1e-6)


def test_unfold_failing_midway_can_be_finished_by_calling_it_again(monkeypatch):
    model = _bert()
    reference = plora.adapter_state_dict(model)
    plora.select_and_fold(model, [1, 2], mode="merge", pristine=False)
    _fail_on_call(monkeypatch, _base, "unfold_", 2)
    with pytest.raises(RuntimeError, match="planted"):
        plora.unfold(model)
    monkeypatch.undo()
    torch.testing.assert_close(plora.adapter_state_dict(model), reference, rtol=0, atol=0)
    assert [layer.is_selected for layer in plora.plora_layers(model).values()] == [False, True]
    plora.unfold(model)
    assert not any(layer.is_selected for layer in plora.plora_layers(model).values())


# ------------------------------------------------------------------ merges into the bases and snapshots


def _updates(model, rank=3, seed=5):
    gen = torch.Generator().manual_seed(seed)
    return {
        n: (torch.randn(rank, layer.in_features, generator=gen) * 0.1, torch.randn(layer.out_features, rank, generator=gen) * 0.1)
        for n, layer in plora.plora_layers(model).items()
    }


def test_merge_into_base_failing_in_the_last_layer_undoes_the_others(monkeypatch):
    model = _mixed_llama()
    updates = _updates(model)
    before = _everything(model)
    # Layer order: q_proj (float, merged then subtracted again), v_proj (NF4, restored from its packed
    # snapshot), o_proj (float: its fold fails).
    calls = _fail_on_call(monkeypatch, _base, "fold_", 2)
    with pytest.raises(RuntimeError, match="planted"):
        plora.merge_into_base(model, updates)
    assert len(calls) == 2
    _assert_unchanged(before, model, base_atol=1e-6)
    monkeypatch.undo()
    # The NF4 merge failing after writing is restored from the snapshot, the float layer before subtracted.
    _fail_on_call(monkeypatch, _base, "fold_nf4_", 1, after=True)
    with pytest.raises(RuntimeError, match="planted"):
        plora.merge_into_base(model, updates)
    _assert_unchanged(before, model, base_atol=1e-6)


def test_merge_into_base_checks_types_first():
    model = _bert()
    before = _everything(model)
    last = list(plora.plora_layers(model))[-1]
    updates = _updates(model)
    with pytest.raises(TypeError, match=f"layer {last}: lora_a must be a torch.Tensor"):
        plora.merge_into_base(model, {**updates, last: (updates[last][0].tolist(), updates[last][1])})
    with pytest.raises(TypeError, match=f"layer {last}: lora_b must be a floating-point"):
        plora.merge_into_base(model, {**updates, last: (updates[last][0], updates[last][1].long())})
    _assert_unchanged(before, model)


def test_restore_bases_checks_every_snapshot_first():
    model = _bert()
    saved = plora.snapshot_bases(model)
    plora.merge_into_base(model, _updates(model))
    before = _everything(model)
    first, last = list(saved)
    for bad, error, match in (
        (saved[last][:, :3], ValueError, "snapshot is"),
        (saved[last].double(), ValueError, "snapshot is"),
        ("weights", TypeError, "tensor"),
    ):
        with pytest.raises(error, match=f"layer {last}: .*{match}"):
            plora.restore_bases(model, {first: saved[first], last: bad})
        _assert_unchanged(before, model)
    plora.restore_bases(model, saved)


# ------------------------------------------------------------------ adapter state and files


def test_load_adapter_state_dict_refuses_non_finite_values_naming_the_tensor():
    model = _bert()
    state = {k: v + 1 for k, v in plora.adapter_state_dict(model).items()}
    before = _everything(model)
    last = sorted(state)[-1]
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = {k: v.clone() for k, v in state.items()}
        bad[last].view(-1)[3] = value
        with pytest.raises(ValueError, match=rf"state\['{last}'\] holds non-finite values"):
            plora.load_adapter_state_dict(model, bad)
        _assert_unchanged(before, model)
    plora.select_and_fold(model, [0], mode="exact")  # also while selected (the trainable copies)
    before = _everything(model)
    with pytest.raises(ValueError, match="non-finite"):
        plora.load_adapter_state_dict(model, bad, strict=False)
    _assert_unchanged(before, model)


def test_load_adapter_refuses_non_finite_and_truncated_files_naming_them(tmp_path):
    source = _bert(seed=1)
    key = next(k for k in plora.adapter_state_dict(source) if k.endswith("value.lora_b"))
    with torch.no_grad():
        plora.plora_layers(source)[key.rsplit(".", 1)[0]].lora_b[0, 0] = float("inf")
    path = tmp_path / "adapter.safetensors"
    plora.save_adapter(source, path)
    model = _bert()
    before = _everything(model)
    with pytest.raises(ValueError, match=rf"{path}: state\['{key}'\] holds non-finite"):
        plora.load_adapter(model, path)
    _assert_unchanged(before, model)

    good = tmp_path / "good.safetensors"
    plora.save_adapter(_bert(seed=2), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"cannot read the safetensors file {truncated}"):
        plora.load_adapter(model, truncated)
    _assert_unchanged(before, model)
    with pytest.raises(FileNotFoundError):
        plora.load_adapter(model, tmp_path / "absent.safetensors")


def test_save_adapter_failing_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    plora.save_adapter(_bert(seed=1), path)
    old = path.read_bytes()
    _fail_on_call(monkeypatch, io, "save_file", 1, after=True)  # the file is written, then the call fails
    with pytest.raises(RuntimeError, match="planted"):
        plora.save_adapter(_bert(seed=2), path)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.undo()
    plora.save_adapter(_bert(seed=2), path)
    assert path.read_bytes() != old and [p.name for p in tmp_path.iterdir()] == [path.name]


# ------------------------------------------------------------------ PEFT files


@pytest.fixture
def peft_dir(tmp_path):
    """A PEFT LoRA adapter of rank 4 with the classifier, exported from a tiny BERT."""
    pytest.importorskip("peft")
    return plora.export_peft(_bert(seed=4), tmp_path / "adapter")


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_from_peft_with_weights_of_another_rank_leaves_the_model_uninjected(peft_dir):
    _edit_config(peft_dir, r=8, lora_alpha=16)
    model = tiny_model("bert")
    before = _everything(model)
    with pytest.raises(ValueError, match=rf"{peft_dir}: state\[.*\] must have shape \((8, 32|32, 8)\), got \((4, 32|32, 4)\)"):
        plora.from_peft(model, peft_dir)
    _assert_unchanged(before, model)
    _edit_config(peft_dir, r=4, lora_alpha=8)
    plora.from_peft(model, peft_dir)  # a retry is not refused as "already injected"
    assert all(layer.r == 4 for layer in plora.plora_layers(model).values())


def test_from_peft_refuses_bad_files_naming_them(peft_dir):
    config_path = peft_dir / "adapter_config.json"
    weights = peft_dir / "adapter_model.safetensors"
    text, data = config_path.read_text(), weights.read_bytes()
    fresh, injected = tiny_model("bert"), _bert(seed=6)
    cases = [
        (lambda: config_path.write_text(text[: len(text) // 2]), f"{config_path} is not valid JSON"),
        (lambda: config_path.write_text("[1, 2]"), f"{config_path} must hold a JSON object"),
        (lambda: _edit_config(peft_dir, peft_type="IA3"), f"{config_path} holds a PEFT IA3 adapter config; only LORA"),
        (lambda: _edit_config(peft_dir, lora_alpha=float("nan")), f"{config_path}: alpha must be a finite"),
        (lambda: config_path.unlink(), f"{config_path} is missing"),
        (lambda: weights.write_bytes(data[: len(data) // 2]), f"cannot read the safetensors file {weights}"),
    ]
    for plant, message in cases:
        plant()
        for model in (fresh, injected):
            before = _everything(model)
            with pytest.raises(ValueError, match=message.replace("[", r"\[")):
                plora.from_peft(model, peft_dir)
            _assert_unchanged(before, model)
        config_path.write_text(text)
        weights.write_bytes(data)
    plora.from_peft(fresh, peft_dir)


def test_from_peft_refuses_non_finite_weights_naming_the_tensor(peft_dir):
    from safetensors.torch import load_file, save_file

    weights = peft_dir / "adapter_model.safetensors"
    state = load_file(weights)
    key = sorted(k for k in state if "lora_A" in k)[-1]
    state[key][1, 2] = float("nan")
    save_file(state, weights)
    for model in (tiny_model("bert"), _bert(seed=6)):
        before = _everything(model)
        with pytest.raises(ValueError, match=rf"{weights}\['{key}'\] holds non-finite values"):
            plora.from_peft(model, peft_dir)
        _assert_unchanged(before, model)


def test_export_peft_failing_leaves_no_half_written_directory(peft_dir, monkeypatch):
    target = peft_dir.parent / "fresh"
    _fail_on_call(monkeypatch, peft_io, "save_file", 1, after=True)  # the config and weights are written, then it fails
    with pytest.raises(RuntimeError, match="planted"):
        plora.export_peft(_bert(seed=7), target)
    assert sorted(p.name for p in peft_dir.parent.iterdir()) == ["adapter"]  # nothing new, no staging left
    old = {p.name: p.read_bytes() for p in peft_dir.iterdir()}
    monkeypatch.undo()
    _fail_on_call(monkeypatch, peft_io, "save_file", 1, after=True)
    with pytest.raises(RuntimeError, match="planted"):
        plora.export_peft(_bert(seed=7), peft_dir)
    assert {p.name: p.read_bytes() for p in peft_dir.iterdir()} == old  # the old export is intact
    assert sorted(p.name for p in peft_dir.parent.iterdir()) == ["adapter"]
    monkeypatch.undo()
    plora.export_peft(_bert(seed=7), peft_dir)  # an export over an old one replaces its files
    assert {p.name for p in peft_dir.iterdir()} == set(old) and (peft_dir / "adapter_model.safetensors").read_bytes() != old[
        "adapter_model.safetensors"
    ]
    assert plora.export_peft(_bert(seed=7), target) == target and {p.name for p in target.iterdir()} == set(old)
    assert sorted(p.name for p in peft_dir.parent.iterdir()) == ["adapter", "fresh"]


def test_a_target_inside_a_module_trained_in_full_is_refused_and_changes_nothing():
    model = tiny_model("bert")  # BERT's "dense" names attention.output.dense, output.dense and pooler.dense
    before = _everything(model)
    config = plora.PLoRAConfig(r=4, target_modules=["dense"], modules_to_save=["bert.pooler", "classifier"])
    with pytest.raises(ValueError, match=r"bert\.pooler\.dense.*inside modules_to_save"):
        plora.inject(model, config)
    _assert_unchanged(before, model)
    plora.inject(model, plora.PLoRAConfig(r=4, target_modules="all-linear", modules_to_save=["bert.pooler", "classifier"]))
    assert not any(n.startswith(("bert.pooler", "classifier")) for n in plora.plora_layers(model))
