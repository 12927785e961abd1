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

import torch

from .answers import first_sentence
from .encoding import Example
from .ffn_site import FFNSite

#: Longest lead tried, in words of the answer's first sentence.
MAX_LEAD_WORDS = 24


def first_target_logprob(site: FFNSite, example: Example) -> float:
    """Log-probability of the first target token after the example's prompt."""
    with torch.no_grad():
        logits = site.logits_at(site.run(example.inputs), example.positions[:1])
    return float(logits.float().log_softmax(-1)[0, int(example.targets[0])])


def answer_lead(
    site: FFNSite, prompt: str, answer: str, encode: Callable[[str], Example]
) -> str | None:
    """``prompt`` plus the first words of ``answer`` (the model's own free answer to it), up
    to the word boundary where the model finds the target's first token likeliest.

    ``encode(text)`` tokenises ``text`` as an edit prompt with the target. ``None`` when the
    likeliest place is the opening of the answer, which the prompt itself already trains.
    """
    words = first_sentence(answer).split()[:MAX_LEAD_WORDS]
    best, lead = first_target_logprob(site, encode(prompt)), None
    for j in range(1, len(words)):  # a lead stops before the sentence's last word
        text = prompt + " ".join(words[:j])
        score = first_target_logprob(site, encode(text))
        if score > best and math.isfinite(score):
            best, lead = score, text
    return lead
