"""Finding what a question is about, when the user did not say.

Subject-swap negatives (:mod:`tpatcher.subject_negatives`) need the edit's subject, and a
correction sent through chat rarely names it. The subjects of factual questions are names:
runs of capitalised words, numbers and the small words that join them ("Edwin of
Northumbria", "USS Ida (1863)", "Apple A5"). The longest such run is the guess. On the
bundled data sets' questions it is the record's subject for about nine in ten and a part of
it for most of the rest ("Steller" for "Steller sea lion"), which still gives negatives of
the same wording about somebody else (``benchmarks/subject_guess.py`` measures it).
"""

from __future__ import annotations

import re

#: Capitalised words that open a sentence without being part of a name.
_OPENERS = frozenset(
    "what who whom whose when where which why how is are was were did does do can could "
    "in on at by from to for of it they he she this that these those name tell please "
    "give list player".split()
)
#: Articles that open a name when a capitalised word follows ("The Loner was released on").
_ARTICLES = frozenset({"the", "a", "an"})
#: Small words that join the parts of one name ("Maso da San Friano", "Webley & Scott").
_JOINERS = frozenset(
    "of the de da di del della der den du des la le von van y and & al el bin ibn e do dos "
    "das upon on at in for".split()
)
_WORD = re.compile(r"\S+")
_TRAILING = '?.,:;!"”)'
_POSSESSIVE = re.compile(r"['’]s$")


def _is_name_part(word: str) -> bool:
    """A capitalised word, a number, or a word holding a digit ("F40", "(1863)")."""
    core = word.lstrip("(\"'“")
    return bool(core) and (core[0].isupper() or any(c.isdigit() for c in core))


def _words(text: str) -> list[tuple[str, int, int, bool, str]]:
    """Each word as (core, start, end, ends_phrase, word): trailing punctuation and a possessive
    "'s" are cut off the core and end the phrase."""
    out = []
    for match in _WORD.finditer(text):
        word, start = match.group(), match.start()
        core = word.rstrip(_TRAILING)
        if word[len(core) : len(core) + 1] == "." and (len(core) == 1 or "." in core):
            core += "."  # an initial or an abbreviation: "T. S. Sinnathuray", "R.A. Dickey"
        elif word.endswith(")") and "(" in core + ")":
            core = word[: len(core) + 1]  # "USS Ida (1863)"
        core = _POSSESSIVE.sub("", core)
        out.append((core, start, start + len(core), core != word, word))
    return out


def _runs(text: str) -> list[tuple[int, int]]:
    """Character spans of every run of name parts and joiners (joiners not at its ends)."""
    words = _words(text)
    runs: list[tuple[int, int]] = []
    current: list[tuple[str, int, int]] = []

    def close() -> None:
        while current and current[-1][0].lower() in _JOINERS:
            current.pop()
        while current and current[0][0] in _JOINERS:  # "of ...", not "The ..." or "La ..."
            current.pop(0)
        if current:
            runs.append((current[0][1], current[-1][2]))
        current.clear()

    for i, (core, start, end, ends, word) in enumerate(words):
        lower = core.lower()
        opening = i == 0 or words[i - 1][3]
        if opening and lower in _ARTICLES:
            following = words[i + 1][0] if i + 1 < len(words) else ""
            part = _is_name_part(following) and following.lower() not in _OPENERS
        elif word.endswith(":"):
            part = False  # a label of the prompt's scaffolding: "Question:", "Answer:"
        else:
            part = _is_name_part(core) and not (opening and lower in _OPENERS)
        if part or (current and lower in _JOINERS):
            current.append((core, start, end))
        else:
            close()
        if ends:
            close()
    close()
    return runs


def guess_subject(question: str) -> str | None:
    """The longest run of name words in ``question`` (a user's question, not a rendered
    chat prompt, whose system turn names the model), or ``None`` when it names nothing."""
    runs = _runs(question)
    if not runs:
        return None
    start, end = max(runs, key=lambda span: span[1] - span[0])
    return question[start:end]
