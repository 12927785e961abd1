"""Subject-swap negatives: the edit's own wording about somebody else.

A neuron keyed on "The mother tongue of Danielle Darrieux is" sits where the relation and
the subject meet. The memory bank holds general text and, at best, a few facts of the same
relation, so nothing stops the key from leaning on the relation alone; then it also fires on
"The mother tongue of Michel Rocard is", a neighbour that must keep its own answer. Over a
thousand CounterFact edits such neighbours were the bulk of the lost locality: 315 of 340
changed neighbour prompts were changed by another edit's neuron of the same relation
(BENCHMARKS.md, "CounterFact with today's defaults").

Given the edit's subject, each wording that names it is repeated with the subject replaced
by invented names (bundled, in no benchmark data set), and the last FFN's inputs at the
edit's supervised positions there join this edit's memory: its neurons must stay below beta
on them, so they key on the subject as well as on the relation. A paraphrase keeps the
subject and is not among them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources

import torch
from torch.nn.utils.rnn import pad_sequence

from .capture import record
from .encoding import Example
from .errors import InvalidEditError
from .ffn_site import FFNSite


@cache
def subject_names() -> tuple[str, ...]:
    """The bundled invented names: people, places, companies, bands, clubs and titles."""
    text = resources.files("tpatcher").joinpath("data/subject_names.txt").read_text("utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def check_subject(subject: str | None, prompt: str) -> None:
    """Refuse a subject the prompt does not name (it could not be swapped out)."""
    if subject is None:
        return
    if not isinstance(subject, str) or not subject.strip():
        raise InvalidEditError("the subject is empty")
    if subject not in prompt:
        raise InvalidEditError(f"the subject {subject!r} does not appear in the prompt")


def swapped_wordings(texts: Sequence[str], subject: str, count: int, seed: int) -> list[str]:
    """Each text naming ``subject``, with it replaced by ``count`` bundled names (the same
    names for every text; none that the texts already contain)."""
    seen = " ".join(texts).lower()
    names = [n for n in subject_names() if n.lower() not in seen and n.lower() != subject.lower()]
    picked = random.Random(seed).sample(names, min(count, len(names)))
    return [text.replace(subject, name) for name in picked for text in texts if subject in text]


def swapped_inputs(
    site: FFNSite, encode: Callable[[str], Example], wordings: Sequence[str]
) -> torch.Tensor:
    """The last FFN's inputs (float32, CPU) at each wording's supervised positions, with the
    edit's target: where the edit's neurons sit on the edit itself. One forward pass for
    all of them, right-padded (so no real token moves and none attends to padding)."""
    if not wordings:
        return torch.zeros(0, site.hidden_size)
    examples = [encode(text) for text in wordings]
    batch = {
        key: pad_sequence([e.inputs[key][0] for e in examples], batch_first=True)
        for key in examples[0].inputs
    }
    with torch.no_grad(), record(site.points(only_q=True)) as store:
        site.run(batch)
    q = store["q"].float().cpu()
    return torch.cat([q[i, e.positions] for i, e in enumerate(examples)])


def subject_negatives(
    site: FFNSite,
    encode: Callable[[str], Example],
    wordings: Sequence[str],
    subject: str | None,
    *,
    count: int,
    seed: int,
) -> torch.Tensor:
    """An edit's negatives: the FFN inputs of its ``wordings`` about ``count`` invented
    subjects (none without a subject or a count)."""
    if subject is None or not count:
        return torch.zeros(0, site.hidden_size)
    return swapped_inputs(site, encode, swapped_wordings(wordings, subject, count, seed))
