"""Other wordings of one edit, so that a fix reaches the forms users ask in.

A chat model often opens its answer by restating the question ("Ayelet Zurer was born in
the city of ...") and names the answer only then. A neuron trained at the opening of the
answer does not fire there, so the fix misses such answers, above all to paraphrases. The
*answer lead* is the model's own answer cut where it is about to state the answer: trained
as one more wording (``Patcher.edit(also=...)``), it places a neuron where the answer is due
in the model's own phrasing, which paraphrased questions tend to share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .answers import first_sentence
from .encoding import Example
from .ffn_site import FFNSite

if TYPE_CHECKING:
    from .patcher import Patcher

#: Longest lead tried, in words of the answer's first sentence.
MAX_LEAD_WORDS = 24
#: Candidate leads scored in one forward pass.
BATCH = 8


def first_target_logprobs(site: FFNSite, examples: list[Example]) -> list[float]:
    """Log-probability of each example's first target token after its prompt.

    Examples go through the model in right-padded batches of :data:`BATCH`: padding after a
    causal model's sequence leaves the logits before it as they are alone.
    """
    scores: list[float] = []
    for start in range(0, len(examples), BATCH):
        chunk = examples[start : start + BATCH]
        width = max(e.inputs["input_ids"].shape[1] for e in chunk)
        batch = {
            key: torch.cat(
                [F.pad(e.inputs[key], (0, width - e.inputs[key].shape[1])) for e in chunk]
            )
            for key in chunk[0].inputs
        }
        with torch.no_grad():
            output = site.run(batch)
        for row, example in enumerate(chunk):
            logits = site.logits_at(output, example.positions[:1], row=row).float()
            scores.append(float(logits.log_softmax(-1)[0, int(example.targets[0])]))
    return scores


def answer_lead(
    site: FFNSite, prompt: str, answer: str, encode: Callable[[str], Example]
) -> str | None:
    """``prompt`` plus the first words of ``answer`` (the model's own free answer to it), up
    to the word boundary where the model finds the target's first token likeliest.

    ``encode(text)`` tokenises ``text`` as an edit prompt with the target. ``None`` when the
    likeliest place is the opening of the answer, which the prompt itself already trains.
    """
    words = first_sentence(answer).split()[:MAX_LEAD_WORDS]
    texts = [prompt] + [prompt + " ".join(words[:j]) for j in range(1, len(words))]
    scores = first_target_logprobs(site, [encode(text) for text in texts])
    best, lead = scores[0], None  # a lead stops before the sentence's last word
    for text, score in zip(texts[1:], scores[1:], strict=True):
        if score > best and math.isfinite(score):
            best, lead = score, text
    return lead


def chat_wordings(
    patcher: Patcher, question: str, target: str, max_new_tokens: int = 48
) -> list[str]:
    """The wordings trained beside a chat edit of ``question``: the bare question and, where
    the model's own chat answer names the answer only after some words, that answer's lead
    (:meth:`tpatcher.Patcher.answer_lead`). What the service's ``wordings="auto"``,
    ``tpatcher edit --chat --lead`` and the demo's ``--lead`` add to an edit."""
    lead = patcher.answer_lead(question, target, max_new_tokens)
    return [question, lead] if lead else [question]
