"""Judging free answers, and the chat-model mistake test on the real SmolLM2."""

from __future__ import annotations

import pytest
from test_core import make_patcher

from tpatcher import InvalidEditError, Patcher, load_model
from tpatcher.answers import contains_answer, first_sentence, normalize_answer


@pytest.mark.parametrize(
    ("text", "sentence"),
    [
        (" The capital is Canberra. It lies inland.", "The capital is Canberra."),
        (
            "It was written by J. R. R. Tolkien. He was English.",
            "It was written by J. R. R. Tolkien.",
        ),
        ("The arch is in St. Louis, Missouri. Tall.", "The arch is in St. Louis, Missouri."),
        ("Born in the U.S. in 1950. Later...", "Born in the U.S. in 1950."),
        ("Paris\nThe capital of France.", "Paris"),
        ("No full stop here", "No full stop here"),
    ],
)
def test_first_sentence(text: str, sentence: str) -> None:
    assert first_sentence(text) == sentence


def test_contains_answer_needs_whole_words_in_the_first_sentence() -> None:
    assert contains_answer("The capital of Australia is Canberra.", "Canberra")
    assert contains_answer("It was Gabriel García Márquez who wrote it.", "gabriel garcía márquez")
    assert not contains_answer("The star Serpensus.", "Serpens")
    assert not contains_answer("Sydney is the largest city. Canberra is the capital.", "Canberra")
    assert not contains_answer("anything", "")
    assert not contains_answer("Titania, a moon.", "Titan")
    assert not contains_answer("Romeo and Juliet", "Rome")
    # punctuation parts words too: the target followed by a possessive, a date, a repeat
    assert contains_answer("VH1's The Last Days has been released on DVD.", "VH1")
    assert contains_answer("1994-02-23: he died at home.", "1994")
    assert contains_answer("contralto:contralto", "contralto")
    assert contains_answer("female.female.female.", "female")
    assert contains_answer("The Eiffel Tower.", "Eiffel-Tower")
    assert contains_answer("The EiffelTower.", "Eiffel-Tower")
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"


def test_is_mistake_by_answer_on_a_tiny_model() -> None:
    patcher = make_patcher("llama")
    answer = patcher.generate("the capital of france is", 8)
    word = answer.split()[0]
    assert not patcher.is_mistake("the capital of france is", word, judge="answer")
    assert patcher.is_mistake("the capital of france is", "zzz-not-a-word", judge="answer")
    with pytest.raises(InvalidEditError, match="judge"):
        patcher.is_mistake("the capital of france is", word, judge="vibes")  # type: ignore[arg-type]
    with pytest.raises(InvalidEditError, match="chat template"):
        patcher.chat_prompt("What is the capital of France?")


def test_a_right_chat_answer_in_a_sentence_is_not_a_mistake_on_smollm2() -> None:
    model, tokenizer = load_model("smollm2-135m")
    patcher = Patcher(model, tokenizer)
    prompt = patcher.chat_prompt("What is the capital of France?")
    assert prompt.rstrip().endswith("assistant")
    answer = patcher.generate(prompt, 24)
    assert "Paris" in first_sentence(answer), answer
    assert patcher.is_mistake(prompt, "Paris", judge="tokens")  # it does not *start* with it
    assert not patcher.is_mistake(prompt, "Paris", judge="answer")
    assert patcher.is_mistake(prompt, "Lyon", judge="answer")
    patcher.close()
