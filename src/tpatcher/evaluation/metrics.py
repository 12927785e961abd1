"""Metric functions and a :class:`Scorer` that asks any model (edited or not) for them.

Every generation metric is computed two ways:

* **teacher-forced token accuracy** (what the papers report): feed prompt + target, take the
  argmax at each target position, and count the share of target tokens predicted. Prompts and
  targets are tokenised by :func:`tpatcher.encoding.encode_edit`, as every editor trains on
  them (a space is inserted between them when neither has one).
* **greedy exact match**: generate ``len(target tokens) + extra`` tokens greedily, keep the
  first line of the continuation (leading whitespace dropped, cut at the first newline),
  normalise it and the target (:func:`normalize_answer`), and count a match when the
  normalised continuation equals the normalised target or starts with it followed by a space
  (the model may go on after the answer; a longer word such as "Serpensus" for "Serpens"
  does not match).

Real use is judged on free answers (:meth:`Scorer.answers`: greedy, stopped at the end of
the turn or of the first sentence) with :func:`tpatcher.answers.contains_answer`, as the
library and the service judge them.

Classifiers have one number per input (the label is right or not); it fills both slots.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria

from ..answers import contains_answer, first_line, first_sentence, normalize_answer
from ..encoding import encode_edit, padding_side
from ..ffn_site import eval_mode

__all__ = [
    "Forced",
    "Scorer",
    "agreement",
    "contains_answer",
    "exact_match",
    "first_line",
    "first_sentence",
    "mean",
    "normalize_answer",
    "perplexity",
    "ratio",
    "token_accuracy",
]


def exact_match(continuation: str, target: str) -> bool:
    """Whether a greedy continuation answers ``target`` (see the module docstring)."""
    got = normalize_answer(first_line(continuation))
    want = normalize_answer(target)
    if not want:
        return False
    return got == want or got.startswith(want + " ")


def token_accuracy(predicted: Sequence[int], targets: Sequence[int]) -> float:
    """Share of target positions whose argmax token is the target token."""
    if len(targets) == 0:
        raise ValueError("no target tokens")
    if len(predicted) != len(targets):
        raise ValueError("predicted and target lengths differ")
    return sum(int(p) == int(t) for p, t in zip(predicted, targets, strict=True)) / len(targets)


def agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions where two argmax sequences agree (teacher-forced locality)."""
    return token_accuracy(a, b)


def mean(values: Sequence[float | bool]) -> float | None:
    """Mean, or ``None`` for no values (a metric over an empty set is undefined, not 0)."""
    return sum(float(v) for v in values) / len(values) if len(values) else None


def ratio(after: float | None, before: float | None) -> float | None:
    """``after / before`` (TrainR/TestR), ``None`` when the base accuracy is 0 or unknown."""
    if after is None or before is None or before == 0:
        return None
    return after / before


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(total_nll / tokens) if tokens else float("nan")


@dataclass
class Forced:
    """Teacher-forced result of one (prompt, target) pair."""

    predicted: list[int]
    targets: list[int]

    @property
    def accuracy(self) -> float:
        return token_accuracy(self.predicted, self.targets)

    @property
    def exact(self) -> bool:
        return self.predicted == self.targets


class _SentenceDone(StoppingCriteria):
    """Marks a row finished once its answer has a complete first sentence: only that is
    judged, so free answers need not run to their token budget."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(
            input_ids[:, self.prompt_length :], skip_special_tokens=True
        )
        done = [first_sentence(t) != first_line(t) or "\n" in t.lstrip() for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Scorer:
    """Asks ``model`` for teacher-forced predictions, greedy continuations and labels, batched.

    Works on any editor's model; edits are tokenised by :func:`tpatcher.encoding.encode_edit`,
    so every method is trained and scored on the same tokens.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        task: str = "causal-lm",
        *,
        add_space_before_target: bool = True,
        batch_size: int = 16,
        extra_tokens: int = 4,
    ) -> None:
        if task not in ("causal-lm", "seq-cls"):
            raise ValueError(f"the harness scores causal-lm and seq-cls models, not {task!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.task = task
        self.add_space = add_space_before_target
        self.batch_size = batch_size
        self.extra_tokens = extra_tokens
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- tokenisation (encode_edit, as every editor) -------------------------------------
    def encode(self, prompt: str, target: str) -> tuple[list[int], list[int], int]:
        """(input ids, target ids, index of the logit that predicts the first target)."""
        example = encode_edit(
            self.tokenizer,
            self.model,
            prompt,
            target,
            task="causal-lm",
            add_space_before_target=self.add_space,
        )
        ids = example.inputs["input_ids"][0].tolist()
        return ids, example.targets.tolist(), int(example.positions[0])

    # -- model calls ---------------------------------------------------------------------
    def forced(self, pairs: Sequence[tuple[str, str]]) -> list[Forced]:
        """Teacher-forced argmax at every target position, right-padded batches."""
        out: list[Forced] = []
        with eval_mode(self.model), torch.no_grad():
            for i in range(0, len(pairs), self.batch_size):
                encoded = [self.encode(p, t) for p, t in pairs[i : i + self.batch_size]]
                width = max(len(ids) for ids, _, _ in encoded)
                pad = int(self.tokenizer.pad_token_id)
                ids = torch.full((len(encoded), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, (seq, _, _) in enumerate(encoded):
                    ids[row, : len(seq)] = torch.tensor(seq)
                    mask[row, : len(seq)] = 1
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
                argmax = logits.argmax(-1).cpu()
                for row, (_, targets, start) in enumerate(encoded):
                    pred = argmax[row, start : start + len(targets)].tolist()
                    out.append(Forced(pred, targets))
        return out

    def generate(
        self, prompts: Sequence[str], new_tokens: Sequence[int], *, sentence: bool = False
    ) -> list[str]:
        """Greedy continuations (text only), ``new_tokens[i]`` tokens for prompt ``i``.

        Prompts are batched in order of their token budget, so one long answer does not make
        a whole batch generate its length; the results come back in the input order. With
        ``sentence`` a row stops at the end of its first sentence (or of the turn).
        """
        order = sorted(range(len(prompts)), key=lambda i: new_tokens[i])
        out: list[str] = [""] * len(prompts)
        with eval_mode(self.model), padding_side(self.tokenizer, "left"), torch.no_grad():
            for i in range(0, len(order), self.batch_size):
                rows = order[i : i + self.batch_size]
                batch = [prompts[j] for j in rows]
                counts = [new_tokens[j] for j in rows]
                enc = self.tokenizer(batch, return_tensors="pt", padding=True).to(self.device)
                width = enc["input_ids"].shape[1]
                stop = [_SentenceDone(self.tokenizer, width)] if sentence else None
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=max(counts),
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                    stopping_criteria=stop,
                )
                new = gen[:, width:].cpu()
                for j, row, n in zip(rows, new, counts, strict=True):
                    out[j] = self.tokenizer.decode(row[:n], skip_special_tokens=True)
        return out

    def answer_budget(self, prompt: str, target: str) -> int:
        """Tokens to generate for an exact-match check: the target's length plus slack."""
        return len(self.encode(prompt, target)[1]) + self.extra_tokens

    def exact(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[bool], list[str]]:
        """Greedy exact match of each (prompt, target), and the continuations."""
        budgets = [self.answer_budget(p, t) for p, t in pairs]
        texts = self.generate([p for p, _ in pairs], budgets)
        return [exact_match(g, t) for g, (_, t) in zip(texts, pairs, strict=True)], texts

    def answers(self, prompts: Sequence[str], max_new_tokens: int = 48) -> list[str]:
        """Free greedy answers (real use): up to ``max_new_tokens`` tokens, the end of the
        turn, or the end of the first sentence, whichever comes first."""
        return self.generate(prompts, [max_new_tokens] * len(prompts), sentence=True)

    def classify(self, texts: Sequence[str]) -> list[int]:
        """Predicted labels of a sequence classifier."""
        out: list[int] = []
        with eval_mode(self.model), torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                ).to(self.device)
                out += self.model(**enc).logits.argmax(-1).cpu().tolist()
        return out

    def continuation_nll(self, text: str, prompt: str) -> torch.Tensor:
        """The negative log-likelihood of each token of ``text`` after its ``prompt`` (the
        generated continuation), on the CPU; empty when nothing follows the prompt."""
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        start = len(self.tokenizer(prompt)["input_ids"])
        if ids.shape[1] - start < 1:
            return torch.zeros(0)
        with eval_mode(self.model), torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device)).logits[0].float().cpu()
        logp = torch.log_softmax(logits[start - 1 : -1], -1)
        return -logp.gather(1, ids[0, start:, None])[:, 0]

    def perplexity(self, texts: Sequence[str], prompts: Sequence[str]) -> float:
        """Perplexity of each text's part after its prompt (the generated continuation)."""
        nll = [self.continuation_nll(t, p) for t, p in zip(texts, prompts, strict=True)]
        return perplexity(sum(float(n.sum()) for n in nll), sum(n.numel() for n in nll))
