"""Tokenisation: one definition shared by the Patcher, every baseline, the metrics and the
service.

An edit (:func:`encode_edit`): for a causal LM the input is ``prompt + target[:-1]`` and
``positions`` are those whose logits predict the target tokens; seq2seq: the target goes to
the decoder; seq-cls: the label, read at position 0. All methods train and are scored on
exactly these tokens. A prompt to answer (:func:`encode_prompt`), a batch of texts
(:func:`encode_texts`) and a chat (:func:`render_chat`) are tokenised here too, so an edit
made through the service matches what the service later answers.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import InvalidEditError

#: What kind of model an edit is for (the adapter table's ``task``).
MODEL_KINDS = ("causal-lm", "seq2seq", "seq-cls")


class ContextLengthError(InvalidEditError):
    """The text does not fit in the model's context."""


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def tokenizer_lock(tokenizer: PreTrainedTokenizerBase) -> threading.RLock:
    """The lock of one tokenizer. A fast tokenizer keeps padding and truncation settings in
    its backend and changes them per call, so concurrent calls (a server's requests beside
    an edit) must not interleave."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(tokenizer)
        if lock is None:
            lock = _LOCKS[tokenizer] = threading.RLock()
        return lock


@contextmanager
def padding_side(tokenizer: PreTrainedTokenizerBase, side: str) -> Iterator[None]:
    """Pad on ``side`` for the block (a pad token is set from EOS where there is none); holds
    the tokenizer's lock meanwhile (:func:`tokenizer_lock`)."""
    with tokenizer_lock(tokenizer):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        previous = getattr(tokenizer, "padding_side", "right")
        tokenizer.padding_side = side
        try:
            yield
        finally:
            tokenizer.padding_side = previous


def tokenize(
    tokenizer: PreTrainedTokenizerBase, text: Any, *, pad_on: str | None = None, **kwargs: Any
) -> Any:
    """``tokenizer(text, **kwargs)`` under its lock, padded on the side ``pad_on`` if given."""
    if pad_on is None:
        with tokenizer_lock(tokenizer):
            return tokenizer(text, **kwargs)
    with padding_side(tokenizer, pad_on):
        return tokenizer(text, **kwargs)


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
        raise ContextLengthError(
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
    if task not in MODEL_KINDS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(MODEL_KINDS)}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidEditError("the prompt is empty")
    if task == "seq-cls":
        label = label_index(model, target)
        ids = tokenize(tokenizer, prompt, return_tensors="pt")
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
        target_ids = list(tokenize(tokenizer, None, text_target=text)["input_ids"])
    else:
        target_ids = list(tokenize(tokenizer, text, add_special_tokens=False)["input_ids"])
    if not target_ids:
        raise InvalidEditError(f"the target {target!r} tokenises to nothing")
    if task == "seq2seq":
        enc = tokenize(tokenizer, prompt, return_tensors="pt")
        _check_length(model, enc["input_ids"].shape[1], "the prompt")
        _check_length(model, len(target_ids), "the target")
        labels = torch.tensor([target_ids])
        decoder_input_ids = model.prepare_decoder_input_ids_from_labels(labels=labels)
        inputs = dict(enc, decoder_input_ids=decoder_input_ids)
        return Example(inputs, torch.arange(len(target_ids)), labels[0])
    prompt_ids = list(tokenize(tokenizer, prompt)["input_ids"])
    if not prompt_ids:
        raise InvalidEditError("the prompt tokenises to nothing")
    _check_length(model, len(prompt_ids) + len(target_ids), "the prompt and target")
    input_ids = torch.tensor([prompt_ids + target_ids[:-1]])
    start = len(prompt_ids) - 1
    positions = torch.arange(start, start + len(target_ids))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    return Example(inputs, positions, torch.tensor(target_ids))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, prompt: str, reserve: int = 0
) -> dict[str, torch.Tensor]:
    """A prompt to continue, refused (:class:`ContextLengthError`) when it and ``reserve``
    new tokens do not fit in the context."""
    enc = dict(tokenize(tokenizer, prompt, return_tensors="pt"))
    n = int(enc["input_ids"].shape[1])
    limit = context_length(model) or 2048
    if n + reserve > limit:
        raise ContextLengthError(
            f"the prompt is {n} tokens; with {reserve} new tokens that exceeds the model's "
            f"context of {limit} tokens"
        )
    return enc


def encode_texts(
    tokenizer: PreTrainedTokenizerBase,
    model: PreTrainedModel,
    texts: Sequence[str],
    task: str,
    max_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """A right-padded batch of texts, truncated to the context; seq2seq texts also feed the
    decoder."""
    limit = max_length or context_length(model) or 512
    enc = dict(
        tokenize(
            tokenizer,
            list(texts),
            pad_on="right",
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=limit,
        )
    )
    if task == "seq2seq":
        enc["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(
            labels=enc["input_ids"]
        )
        enc["decoder_attention_mask"] = enc["attention_mask"]
    return enc


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, Any]] | str
) -> str:
    """The chat template with the assistant's turn opened, as the model was tuned; a string
    is one user message. The BOS the tokenizer adds itself is not doubled."""
    if not has_chat_template(tokenizer):
        raise InvalidEditError("this model has no chat template")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    text = str(
        tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    )
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        ids = tokenize(tokenizer, text)["input_ids"]
        if ids[:2] == [tokenizer.bos_token_id] * 2:
            text = text[len(bos) :]
    return text
