"""Two settings for fixes that reach further without leaking: chat memory with the model's
own answers (the FFN inputs of each memory turn followed by the unedited model's greedy
answer, built once and cached) and the edit headroom (neurons trained weaker than they are
committed)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_core import MEMORY_TEXTS, PROMPT, make_patcher
from tiny import make_model, make_tokenizer

from tpatcher import Patcher, PatcherConfig
from tpatcher import memory as memory_module
from tpatcher.encoding import render_chat

TEXTS = ["the weather today is good", "who wrote the famous novel", "paris is in france"]


def _chat_tokenizer():
    tokenizer = make_tokenizer("llama")
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %} the"
    return tokenizer


def _patcher(answers: int) -> Patcher:
    config = PatcherConfig(memory_chat_answers=answers, memory_questions=False)
    return Patcher(make_model("llama"), _chat_tokenizer(), config, memory_texts=TEXTS)


def _greedy_one_by_one(patcher: Patcher, prompt: str, tokens: int) -> str:
    tok = patcher.tokenizer
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = patcher.model.generate(
            **enc, max_new_tokens=tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    return prompt + tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def test_the_bank_holds_each_memory_turn_with_the_models_own_answer(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TPATCHER_CACHE", str(tmp_path))
    plain, answered = _patcher(0), _patcher(5)
    assert "answers" not in plain.memory.source and "answers" in answered.memory.source
    extra = answered.memory.vectors()[len(plain.memory) :]
    turns = [render_chat(answered.tokenizer, t) for t in TEXTS]
    written = [_greedy_one_by_one(answered, turn, 5) for turn in turns]
    assert all(len(w) > len(t) for w, t in zip(written, turns, strict=True))
    expected = answered.ffn_inputs(written).float()
    assert extra.shape == expected.shape
    assert torch.allclose(extra, expected, atol=1e-5)

    def refuse(*args, **kwargs):
        raise AssertionError("the answers were generated again instead of read from the cache")

    monkeypatch.setattr(memory_module, "generate_continuations", refuse)
    again = _patcher(5)
    assert torch.equal(again.memory.vectors(), answered.memory.vectors())


def test_answers_need_chat_memory_and_a_non_negative_length() -> None:
    tokenizer = make_tokenizer("llama")  # no chat template: no turns, so no answers either
    config = PatcherConfig(memory_chat_answers=5)
    patcher = Patcher(make_model("llama"), tokenizer, config, memory_texts=TEXTS)
    assert "answers" not in patcher.memory.source
    with pytest.raises(ValueError, match="memory_chat_answers"):
        PatcherConfig(memory_chat_answers=-1)


def _fixed_at(patcher: Patcher, fraction: float) -> bool:
    """Whether the edit still holds with every committed neuron's value scaled by ``fraction``."""
    state = patcher._layer.state
    weaker = dataclasses.replace(state, values=state.values * fraction)
    with patcher._layer.private(weaker):
        return not patcher.is_mistake(PROMPT, "berlin")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_headroom_trains_weaker_neurons_and_commits_them_at_full_strength(kind) -> None:
    # small initial values, so that training (not the initialisation) sets their size
    patchers = {h: make_patcher(kind, edit_headroom=h, value_amplifier_init=0.5) for h in (1, 0.05)}
    for patcher in patchers.values():
        assert patcher.edit(PROMPT, "berlin").success
        assert not patcher.is_mistake(PROMPT, "berlin")  # committed at full strength
    assert _fixed_at(patchers[0.05], 0.05)  # trained to hold at a twentieth of it
    assert not _fixed_at(patchers[1], 0.05)  # the paper's form: no such room
    with pytest.raises(ValueError, match="edit_headroom"):
        PatcherConfig(edit_headroom=0)


def _edit_pre_activations(patcher: Patcher) -> torch.Tensor:
    """The committed neurons' pre-activations at the last token of PROMPT."""
    state = patcher.neurons
    pre = state.keys.float() @ patcher.ffn_inputs([PROMPT])[-1].float()
    return pre if state.biases is None else pre + state.biases.float()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_activation_floor_raises_the_edits_pre_activation_and_keeps_memory_silent(kind) -> None:
    patchers = {f: make_patcher(kind, activation_floor=f) for f in (0.0, 4.0)}
    for patcher in patchers.values():
        assert patcher.edit(PROMPT, "berlin").success
        assert not patcher.is_mistake(PROMPT, "berlin")
    raised, paper = (float(_edit_pre_activations(patchers[f])[0]) for f in (4.0, 0.0))
    assert raised >= 4.0 > paper  # the paper's form stops as soon as the edit is fixed
    floored = patchers[4.0]
    state = floored.neurons
    memory = floored.ffn_inputs(MEMORY_TEXTS).float() @ state.keys.float().T
    if state.biases is not None:
        memory = memory + state.biases.float()
    assert float(memory.max()) < 0  # the firing point moved, the memory stays silent
    with pytest.raises(ValueError, match="activation_floor"):
        PatcherConfig(activation_floor=-1)


def test_floor_on_the_first_position_only() -> None:
    from tpatcher.editing import _floors

    first = torch.tensor([True, False, True, False])
    config = PatcherConfig(activation_floor=4.0, floor_first_position_only=True)
    assert _floors(config, "causal-lm", "relu", first).tolist() == [4.0, 0.0, 4.0, 0.0]
    everywhere = PatcherConfig(activation_floor=4.0, floor_first_position_only=False)
    assert _floors(everywhere, "causal-lm", "relu", first).tolist() == [4.0] * 4
    # the default: 3 for generation with ReLU/GELU neurons; the paper's 0 for a classifier
    # and for SiLU neurons; an explicit value wins
    default = PatcherConfig()
    assert default.resolved_activation_floor("causal-lm", "relu") == 3.0
    assert default.resolved_activation_floor("seq2seq", "gelu_new") == 3.0
    assert default.resolved_activation_floor("seq-cls", "gelu") == 0.0
    assert default.resolved_activation_floor("causal-lm", "silu") == 0.0
    assert config.resolved_activation_floor("seq-cls", "silu") == 4.0
    patcher = make_patcher("llama", activation_floor=4.0, floor_first_position_only=True)
    assert patcher.edit(PROMPT, "berlin").success
    assert float(_edit_pre_activations(patcher)[0]) >= 4.0  # the first target token's neuron


def test_the_papers_form_in_one_setting() -> None:
    paper = PatcherConfig.paper()
    assert paper.neuron_activation is None and paper.max_neurons_per_edit == 5
    assert paper.edit_headroom == 1.0 and paper.memory_chat_format is False
    assert paper.resolved_activation_floor("causal-lm", "relu") == 0.0
    assert PatcherConfig.paper(seed=3).seed == 3 and PatcherConfig.paper().seed == 0
    patcher = Patcher(
        make_model("llama"), make_tokenizer("llama"), paper, memory_texts=MEMORY_TEXTS
    )
    assert patcher.activation == "silu"  # the FFN's own, as in the paper
    result = patcher.edit(PROMPT, "berlin")
    assert result.success and 1 <= result.neurons <= 5


def test_everyday_questions_join_chat_memory_with_every_opening_kept(tmp_path, monkeypatch) -> None:
    """The bundled questions go in as chat turns, and each turn's last-token FFN input (where
    a chat edit's first neuron sits) stays in the bank even when the size caps drop most."""
    monkeypatch.setenv("TPATCHER_CACHE", str(tmp_path))
    tokenizer = _chat_tokenizer()

    def patcher(questions: bool) -> Patcher:
        config = PatcherConfig(memory_questions=questions, memory_chat_answers=0, memory_size=40)
        return Patcher(make_model("llama"), tokenizer, config, memory_texts=TEXTS)

    without, with_questions = patcher(False), patcher(True)
    assert "everyday questions" in with_questions.memory.source
    assert "everyday questions" not in without.memory.source
    turns = [render_chat(tokenizer, t) for t in TEXTS + memory_module.default_questions()]
    bank = with_questions.memory.vectors()
    assert len(bank) >= len(turns) > 40 // 4  # more openings than the chat turns' cap
    openings = torch.stack([with_questions.ffn_inputs([turn])[-1].float() for turn in turns])
    nearest = torch.cdist(openings, bank, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert float(nearest.max()) < 1e-3  # every opening is in the bank
    assert not PatcherConfig.paper().memory_questions


def test_an_edit_of_a_memory_text_is_not_trained_against_itself() -> None:
    """Editing a text the memory holds (a bundled question, say) leaves out the memory rows
    that are the new neurons' own inputs, so the neuron is not pushed silent where it must
    fire: without that, this edit ends with its activation loss near 9 instead of 0.2."""
    from tpatcher.editing import apart_from

    memory = torch.randn(50, 8)
    kept = apart_from(memory, memory[[3, 7]] + 1e-4)
    assert len(kept) == 48 and not (kept == memory[3]).all(-1).any()
    assert torch.equal(apart_from(memory, torch.randn(2, 8) * 10), memory)

    texts = [*MEMORY_TEXTS, PROMPT, f"{PROMPT} paris"]
    patcher = Patcher(make_model("llama"), make_tokenizer("llama"), memory_texts=texts)
    result = patcher.edit(PROMPT, "berlin")
    assert result.success and result.losses["act"] < 1.0
