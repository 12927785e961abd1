"""Tokenising an edit: one definition shared by the Patcher and every baseline editor.

Causal LM: the input is ``prompt + target[:-1]`` and ``positions`` are those whose logits
predict the target tokens. Seq2seq: the target goes to the decoder. Seq-cls: the label, read
at position 0. All methods train and are scored on exactly these tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import InvalidEditError

TASKS = ("causal-lm", "seq2seq", "seq-cls")


@dataclass
class Example:
    """One tokenised edit: model inputs and the supervised positions."""

    inputs: dict[str, torch.Tensor]
    positions: torch.Tensor  # positions in the FFN's sequence whose outputs are supervised
    targets: torch.Tensor  # token ids (generation) or the label (classification)


def context_length(model: PreTrainedModel) -> int | None:
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_length(model: PreTrainedModel, length: int, what: str) -> None:
    limit = context_length(model)
    if limit is not None and length > limit:
        raise InvalidEditError(
            f"{what} is {length} tokens, longer than the model's context of {limit}"
        )


def label_index(model: PreTrainedModel, label: str | int | None) -> int:
    num_labels = int(model.config.num_labels)
    if isinstance(label, str):
        mapping = {str(k).lower(): int(v) for k, v in model.config.label2id.items()}
        if label.lower() not in mapping:
            raise InvalidEditError(
                f"label {label!r} is not one of the head's labels {sorted(mapping)}"
            )
        return mapping[label.lower()]
    if isinstance(label, bool) or not isinstance(label, int):
        raise InvalidEditError(f"a classification edit needs an integer label, got {label!r}")
    if not 0 <= label < num_labels:
        raise InvalidEditError(
            f"label {label} is outside the head's {num_labels} labels (0..{num_labels - 1})"
        )
    return label


def encode_edit(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    prompt: str,
    target: str | int | None,
    *,
    task: str,
    add_space_before_target: bool = True,
) -> Example:
    """Tokenise one edit; raises :class:`InvalidEditError` (a ``ValueError``) if unusable."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidEditError("the prompt is empty")
    if task == "seq-cls":
        label = label_index(model, target)
        ids = tokenizer(prompt, return_tensors="pt")
        _check_length(model, ids["input_ids"].shape[1], "the text")
        return Example(dict(ids), torch.tensor([0]), torch.tensor([label]))
    if not isinstance(target, str) or not target.strip():
        raise InvalidEditError("the target is empty")
    text = target
    if (
        add_space_before_target
        and task == "causal-lm"
        and not prompt[-1:].isspace()
        and not target[:1].isspace()
    ):
        text = " " + target
    if task == "seq2seq":
        target_ids = list(tokenizer(text_target=text)["input_ids"])
    else:
        target_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise InvalidEditError(f"the target {target!r} tokenises to nothing")
    if task == "seq2seq":
        enc = tokenizer(prompt, return_tensors="pt")
        _check_length(model, enc["input_ids"].shape[1], "the prompt")
        _check_length(model, len(target_ids), "the target")
        labels = torch.tensor([target_ids])
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        inputs = dict(enc, decoder_input_ids=decoder_input_ids)
        return Example(inputs, torch.arange(len(target_ids)), labels[0])
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise InvalidEditError("the prompt tokenises to nothing")
    _check_length(model, len(prompt_ids) + len(target_ids), "the prompt and target")
    input_ids = torch.tensor([prompt_ids + target_ids[:-1]])
    start = len(prompt_ids) - 1
    positions = torch.arange(start, start + len(target_ids))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return Example(inputs, positions, torch.tensor(target_ids))
