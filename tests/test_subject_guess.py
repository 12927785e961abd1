"""Guessing an edit's subject from a question that does not name it separately."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpatcher import guess_subject


@pytest.mark.parametrize(
    ("question", "subject"),
    [
        ("The mother tongue of Ada Lindqvist is", "Ada Lindqvist"),
        ("What studio released the film The Grey Orchard?", "The Grey Orchard"),
        ("The Quiet Ferns was released on", "The Quiet Ferns"),
        ("Which river flows through Old Harbour City?", "Old Harbour City"),
        ("Who was Lady Mara Fenwick's father?", "Lady Mara Fenwick"),
        ("In what city did T. S. Orrin die?", "T. S. Orrin"),
        ("What war did USS Kestrel (1863) fight in?", "USS Kestrel (1863)"),
        ("Solvang Motors X40, developed by", "Solvang Motors X40"),
        ("Which band did Maso da San Teo found?", "Maso da San Teo"),
        ("Who designed the Tower of Lund?", "Tower of Lund"),
        ("Question: What is the capital of Nigeria?\nAnswer:", "Nigeria"),
    ],
)
def test_the_longest_name_in_the_question_is_the_subject(question: str, subject: str) -> None:
    assert guess_subject(question) == subject


def test_a_question_without_a_name_has_no_subject() -> None:
    assert guess_subject("What is the capital of the country?") is None
    assert guess_subject("Who wrote it?") is None
    assert guess_subject("") is None


def test_on_the_data_sets_the_guess_is_mostly_the_records_subject(data_dir: Path) -> None:
    """A guess is always text of the question; on the public questions it is the record's
    subject for most and overlaps it for nearly all (the made-up set's names are simple)."""
    zsre = json.loads((data_dir / "zsre" / "zsre_mend_train_800.json").read_text("utf-8"))
    counterfact = json.loads((data_dir / "counterfact" / "counterfact-edit.json").read_text())
    pairs = [(r["src"], r["subject"]) for r in zsre]
    pairs += [(r["prompt"], r["subject"]) for r in counterfact[:1000]]
    guesses = [guess_subject(text) for text, _ in pairs]
    assert all(g is None or g in text for g, (text, _) in zip(guesses, pairs, strict=True))
    exact = sum(g == s for g, (_, s) in zip(guesses, pairs, strict=True)) / len(pairs)
    overlap = sum(
        bool(g) and (g in s or s in g) for g, (_, s) in zip(guesses, pairs, strict=True)
    ) / len(pairs)
    assert exact >= 0.85 and overlap >= 0.98, (exact, overlap)
