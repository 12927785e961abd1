"""Judging a free answer: does what the model wrote contain the target?

A chat model answers in sentences ("The capital of Australia is Canberra."), so a check
that the answer *starts with* the target calls a right answer a mistake. These functions
are shared by :meth:`tpatcher.Patcher.is_mistake` (``judge="answer"``), the demo and the
evaluation's real-use metrics, so all of them judge alike.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_PUNCT_APART = str.maketrans(string.punctuation, " " * len(string.punctuation))
#: Words after which a full stop does not end a sentence.
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "st", "mt", "jr", "sr", "no", "vs", "etc", "prof"}
_END = re.compile(r"[.!?](?=\s|$)")


def normalize_answer(text: str, *, punctuation_parts_words: bool = False) -> str:
    """SQuAD-style normalisation: lowercase, no punctuation, no articles, single spaces;
    with ``punctuation_parts_words`` punctuation becomes a space ("VH1's" -> "vh1 s")."""
    text = text.lower().translate(_PUNCT_APART if punctuation_parts_words else _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_line(text: str) -> str:
    """The text up to its first newline, after dropping leading whitespace."""
    return text.lstrip().split("\n", 1)[0]


def first_sentence(text: str) -> str:
    """The first sentence of a free answer (its first line, cut at the first ``.``, ``!``
    or ``?`` followed by a space that does not close an initial or a common abbreviation)."""
    line = first_line(text)
    for match in _END.finditer(line):
        words = line[: match.start()].split()
        last = words[-1].lower() if words else ""
        if len(last) == 1 or last in _ABBREVIATIONS or (match.group() == "." and "." in last):
            continue  # "J. R. R. Tolkien", "St. Louis", "U.S."
        return line[: match.end()]
    return line


def contains_answer(text: str, target: str) -> bool:
    """Whether the normalised target appears, as whole words, in the answer's first sentence.

    Words are compared with punctuation dropped ("Eiffel-Tower" = "EiffelTower") and with
    punctuation as a word boundary, so "VH1's film", "1994-02-23" and "contralto:contralto"
    name "VH1", "1994" and "contralto"; "Titania" does not name "Titan"."""
    sentence = first_sentence(text)
    for apart in (False, True):
        want = normalize_answer(target, punctuation_parts_words=apart)
        got = normalize_answer(sentence, punctuation_parts_words=apart)
        if want and f" {want} " in f" {got} ":
            return True
    return False
