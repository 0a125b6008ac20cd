"""Tokenisation of examples and padding of batches.

Classification: the tokenizer's own encoding of ``text`` (and ``text_pair``). Generation, training:
``prompt + target + eos`` with labels -100 on the prompt (loss on the target only), the prompt cut from
the left when too long. Generation, evaluation: the prompt alone, padded on the left for ``generate``.
"""

from __future__ import annotations

import torch


def encode_classification(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Per example: ``input_ids`` (and ``token_type_ids`` where the tokenizer makes them) and ``labels``."""
    out = []
    for ex in examples:
        enc = tokenizer(ex["text"], ex["text_pair"], truncation=True, max_length=max_length)
        feature = {"input_ids": enc["input_ids"], "labels": ex["label"]}
        if "token_type_ids" in enc:
            feature["token_type_ids"] = enc["token_type_ids"]
        out.append(feature)
    return out


def encode_generation_train(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """``input_ids`` = prompt + target + eos (at most ``max_length``), ``labels`` masked on the prompt."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ex in examples:
        prompt = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        target = (tokenizer(ex["target"], add_special_tokens=False)["input_ids"] + eos)[:max_length]
        prompt = prompt[max(0, len(prompt) - (max_length - len(target))) :]
        out.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    return out


def encode_generation_eval(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """``input_ids`` = the prompt's last ``max_length`` tokens; ``reference`` kept for the metric."""
    out = []
    for ex in examples:
        prompt = tokenizer(ex["prompt"], add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt[-max_length:], "reference": ex["reference"]})
    return out


def collate(features: list[dict], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (and ``token_type_ids``, sequence ``labels``) to the longest; add ``attention_mask``.

    Integer ``labels`` (classification) become a ``[B]`` tensor; ``reference`` is not collated.
    """
    width = max(len(f["input_ids"]) for f in features)

    def pad(seq: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(seq))
        return fill + seq if left else seq + fill

    batch = {
        "input_ids": torch.tensor([pad(f["input_ids"], pad_id) for f in features]),
        "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features]),
    }
    if "token_type_ids" in features[0]:
        batch["token_type_ids"] = torch.tensor([pad(f["token_type_ids"], 0) for f in features])
    if "labels" in features[0]:
        labels = [f["labels"] for f in features]
        batch["labels"] = torch.tensor([pad(y, -100) for y in labels] if isinstance(labels[0], list) else labels)
    return batch
