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

Invented names are unknown to the model, and its picture of a name it knows (a country, a
film, a person in its training text) differs from its picture of an unknown one; a key
trained against invented names alone can still fire on a real neighbour.
``known_subject_negatives`` swaps in real names too: the subjects guessed in the memory texts
and the bundled everyday questions, and the subjects of the earlier edits
(:func:`known_names`). With ``known_subject_pick="nearest"`` the names swapped in are those
the model pictures most like the subject (:func:`name_vectors`: cities for a city, people for
a person), the neighbours a key is likeliest to fire on, rather than a random draw.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from importlib import resources

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from .capture import record
from .encoding import Example
from .errors import InvalidEditError
from .ffn_site import FFNSite
from .memory import default_questions
from .subject_guess import guess_subject

#: Capitalised words that open ordinary sentences and are no one's name.
_NOT_NAMES = frozenset("i my here there once write this it we you our your his her their".split())


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


def known_names(texts: Iterable[str]) -> tuple[str, ...]:
    """The subjects guessed in ``texts`` and in the bundled everyday questions, each once, in
    order: names the model has met, unlike :func:`subject_names`."""
    out: dict[str, str] = {}
    for text in [*texts, *default_questions()]:
        name = guess_subject(text)
        if name and len(name) > 2 and any(c.isalpha() for c in name):
            if name.lower() not in _NOT_NAMES:
                out.setdefault(name.lower(), name)
    return tuple(out.values())


#: Words a name is read after for its picture (:func:`name_vectors`), so that its last
#: token is never a sequence's first, whose FFN input is an outlier in causal LMs.
NAME_CONTEXT = "This is about "


def name_vectors(
    site: FFNSite, tokenizer: PreTrainedTokenizerBase, names: Sequence[str], batch: int = 64
) -> torch.Tensor:
    """(n, d) float32: the last FFN's input at each name's last token after
    :data:`NAME_CONTEXT`, the model's picture of the name (causal LMs: one right-padded pass
    per ``batch`` names)."""
    rows = [torch.zeros(0, site.hidden_size)]
    for start in range(0, len(names), batch):
        ids = [
            tokenizer(NAME_CONTEXT + name, return_tensors="pt")["input_ids"][0]
            for name in names[start : start + batch]
        ]
        lengths = torch.tensor([len(i) for i in ids])
        input_ids = pad_sequence(ids, batch_first=True, padding_value=tokenizer.pad_token_id or 0)
        mask = (torch.arange(input_ids.shape[1]) < lengths[:, None]).long()
        q = site.ffn_inputs({"input_ids": input_ids, "attention_mask": mask}, "attention_mask")
        rows.append(q[lengths.cumsum(0) - 1])  # each row's last real token
    return torch.cat(rows)


def nearest_first(subject: torch.Tensor, names: Sequence[str], vectors: torch.Tensor) -> list[str]:
    """``names`` ordered by the cosine of their vectors to the subject's, nearest first."""
    cosine = torch.nn.functional.cosine_similarity(vectors, subject[None], dim=-1)
    return [names[i] for i in cosine.argsort(descending=True, stable=True).tolist()]


def picked_names(
    texts: Sequence[str],
    subject: str,
    count: int,
    seed: int,
    names: Sequence[str] | None = None,
    *,
    in_order: bool = False,
) -> list[str]:
    """``count`` of ``names`` (the bundled invented names by default) to swap for ``subject``
    in ``texts``: none that the texts already contain and none that contains the subject; a
    seeded draw, or with ``in_order`` the first ``count`` of them."""
    seen, own = " ".join(texts).lower(), subject.lower()
    pool = subject_names() if names is None else names
    names = [n for n in pool if n.lower() not in seen and own not in n.lower()]
    if in_order:
        return names[:count]
    return random.Random(seed).sample(names, min(count, len(names)))


def swapped_wordings(
    texts: Sequence[str],
    subject: str,
    count: int,
    seed: int,
    names: Sequence[str] | None = None,
    *,
    in_order: bool = False,
) -> list[str]:
    """Each text naming ``subject``, with it replaced by each of :func:`picked_names` (the
    same names for every text)."""
    picked = picked_names(texts, subject, count, seed, names, in_order=in_order)
    return about(texts, subject, picked)


def about(texts: Sequence[str], subject: str, names: Sequence[str]) -> list[str]:
    """Each text naming ``subject`` with it replaced by each of ``names``, name by name."""
    return [text.replace(subject, name) for name in names for text in texts if subject in text]


def swapped_inputs(
    site: FFNSite, encode: Callable[[str], Example], wordings: Sequence[str]
) -> torch.Tensor:
    """The last FFN's inputs (float32, CPU) at each wording's supervised positions, with the
    edit's target: where the edit's neurons sit on the edit itself."""
    if not wordings:
        return torch.zeros(0, site.hidden_size)
    return inputs_at_positions(site, [encode(text) for text in wordings])


def inputs_at_positions(site: FFNSite, examples: Sequence[Example]) -> torch.Tensor:
    """The last FFN's inputs (float32, CPU) at each example's supervised positions. One
    forward pass for all of them, right-padded (so no real token moves and none attends to
    padding)."""
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
    known: Sequence[str] = (),
    known_count: int = 0,
    known_in_order: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """An edit's negatives: the FFN inputs of its ``wordings`` about ``count`` invented
    subjects and ``known_count`` of the ``known`` names (drawn, or with ``known_in_order``
    the first of them; none without a subject), and the names swapped in."""
    if subject is None or not count + known_count:
        return torch.zeros(0, site.hidden_size), []
    picked = picked_names(wordings, subject, count, seed)
    if known_count:
        picked += picked_names(
            wordings, subject, known_count, seed, names=known, in_order=known_in_order
        )
    return swapped_inputs(site, encode, about(wordings, subject, picked)), picked
