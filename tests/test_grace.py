"""Tests for GRACE in the reference's form (tpatcher.evaluation.grace).

Tiny random llama models stand in for real ones, built with a 0.2 initialisation as in
tests/test_wise_memoir.py: with the default 0.02 every late-FFN input is tiny and alike, so
any two prompts would fall within one deferral radius.
"""

from __future__ import annotations

import pytest
import torch
from tiny import MEMORY_TEXTS, logits_of, make_model, make_tokenizer, wide_llama

from tpatcher import InvalidEditError, UnsupportedModelError
from tpatcher.evaluation import protocol
from tpatcher.evaluation.grace import Codebook, GraceEditor

EDITS = [
    ("the capital of france is", "berlin"),
    ("the cat sleeps in the", "car"),
    ("who wrote the famous", "song"),
]
UNRELATED = ["the weather today is good", "a dog runs in the park", "one two three four five"]
RULES = ["replace_last", "replace_all", "replace_prompt"]


def test_sequence_of_edits_generation_and_deferral() -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits_of(model, tok, UNRELATED)
    editor = GraceEditor(model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS)
    for prompt, target in EDITS:
        assert not editor.is_fixed(editor.encode(prompt, target))
        outcome = editor.edit(prompt, target)
        assert outcome.success, outcome.details
        assert outcome.details["action"] == "new" and outcome.details["tail"] is True
        assert outcome.details["steps"] == editor.config.n_iter  # no early stop
    assert editor.size == 3
    assert all(editor.is_fixed(editor.encode(p, t)) for p, t in EDITS)  # none undone
    # unrelated inputs miss every key: exactly the base model's logits
    assert torch.equal(logits_of(model, tok, UNRELATED), base)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    # greedy generation with the KV cache, one prompt at a time and left-padded together
    for prompt, target in EDITS:
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0)
        assert tok.decode(out[0, -1:]).strip() == target
    tok.padding_side = "left"
    enc = tok([p for p, _ in EDITS], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert [tok.decode(row[-1:]).strip() for row in out] == [t for _, t in EDITS]
    editor.close()
    assert not editor.is_fixed(editor.encode(*EDITS[0]))
    assert not model.model.layers[1].mlp.down_proj._forward_hooks


@pytest.mark.parametrize("rule", RULES)
def test_cached_generation_computes_the_teacher_forced_pass(rule: str) -> None:
    """Each rule with a 3-token target at layer 0 (so the change reaches later tokens): the
    logits of ``generate`` (KV cache) equal a teacher-forced pass over what it generated."""
    model, tok = wide_llama(), make_tokenizer("llama")
    editor = GraceEditor(model, tok, task="causal-lm", layer=0, replacement=rule)
    prompt, target = "the capital of france is", "rome is big"
    example = editor.encode(prompt, target)
    with torch.no_grad():
        base = model(**example.inputs).logits[0, example.positions]
    outcome = editor.edit(prompt, target)
    with torch.no_grad():
        edited = model(**example.inputs).logits[0, example.positions]
    assert not torch.allclose(edited[0], base[0])  # the edit is applied at the key token
    enc = tok(prompt, return_tensors="pt")
    gen = model.generate(
        **enc,
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    cached = torch.cat(gen.logits)
    n = enc["input_ids"].shape[1]
    with torch.no_grad():
        forced = model(input_ids=gen.sequences[:, :-1]).logits[0, n - 1 :]
    assert torch.allclose(cached, forced, atol=1e-4)
    if outcome.success:
        assert tok.decode(gen.sequences[0, n:]) == target
    editor.close()


def test_replace_all_rules_and_re_edits() -> None:
    """replace_all (the cached decoding keeps the row's value) takes a multi-token edit; a
    repeated edit is covered, a conflicting one on the same prompt splits and wins."""
    model, tok = wide_llama(), make_tokenizer("llama")
    editor = GraceEditor(model, tok, task="causal-lm", layer=0, replacement="replace_all")
    prompt = "the capital of france is"
    assert editor.edit(prompt, "rome is big").success
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert tok.decode(out[0, enc["input_ids"].shape[1] :]) == "rome is big"
    again = editor.edit(prompt, "rome is big")
    assert again.details["action"] == "covered" and editor.size == 1
    other = editor.edit(prompt, "paris")
    assert other.details["action"] == "split" and editor.size == 2
    assert other.success and not editor.is_fixed(editor.encode(prompt, "rome is big"))
    radii = editor.codebook.radii.tolist()
    # the two queries are equal or float noise apart (captures of different lengths): tiny
    # halves, and the newer key wins
    assert radii[0] < 0 <= radii[1] < 1e-4
    editor.close()


def test_codebook_rules() -> None:
    book = Codebook(eps=1.0)
    d = 8
    value = torch.ones(4)

    def at(*coords: float) -> torch.Tensor:
        q = torch.zeros(d)
        q[: len(coords)] = torch.tensor(coords)
        return q

    assert book.update(at(0.0), value, (5,)) == "new" and book.radii.tolist() == [1.0]
    assert book.update(at(3.0), value, (5,)) == "new"  # beyond eps + radius
    assert book.update(at(0.0, 0.5), value, (5,)) == "covered"  # within the radius
    assert book.update(at(0.0, 1.5), value, (5,)) == "expand"  # in reach, same label
    assert book.size == 2 and book.radii[0].item() == pytest.approx(1.5)
    assert book.update(at(0.0, 0.0, 1.2), value, (7,)) == "split"  # in reach, other label
    assert book.size == 3 and book.labels[-1] == (7,)
    assert book.radii[0].item() == pytest.approx(0.6 - 1e-5)
    assert book.radii[2].item() == pytest.approx(0.6)
    hit, idx = book.lookup(torch.stack([at(0.0), at(0.0, 0.0, 1.2), at(0.0, 0.0, 0.6), at(9.0)]))
    # the midpoint is as near to both keys: the newer one, whose radius reaches it, wins
    assert hit.tolist() == [True, True, True, False] and idx[:3].tolist() == [0, 2, 2]
    assert book.update(at(3.0), value, (5, 6)) == "split"  # labels compare whole targets
    # a conflicting edit at an existing key's exact place: both radii collapse, the newer wins
    assert book.radii[1].item() < 0 and book.radii[3].item() == 0.0
    hit, idx = book.lookup(at(3.0)[None])
    assert hit.tolist() == [True] and idx.tolist() == [3] and book.labels[3] == (5, 6)
    moving = Codebook(eps=1.0, expand="moving_average")
    moving.update(at(0.0), value, (1,))
    assert moving.update(at(1.6), value, (1,)) == "expand"
    assert torch.allclose(moving.keys[0], at(0.8)) and moving.radii[0].item() == pytest.approx(1.6)


def test_settings_recorded_and_method_table() -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    editor = GraceEditor(model, tok, task="causal-lm")
    expected = dict(edit_lr=1.0, n_iter=50, eps=1.0, eps_expand="coverage", val_init="cold")
    expected.update(replacement="replace_last", seed=0, add_space_before_target=True)
    expected.update(method="grace", task="causal-lm", layer=1)
    expected.update(layer_path="model.layers.1.mlp.down_proj")
    assert editor.settings() == expected
    editor.close()
    assert protocol.EDITORS["grace"] == "tpatcher.evaluation.grace:GraceEditor"
    assert protocol.EDITORS["grace-tokens"] == "tpatcher.evaluation.baselines:GraceTokensEditor"
    assert protocol.editor_class("grace") is GraceEditor
    assert protocol.editor_class("grace-tokens").name == "grace-tokens"
    assert "grace-tokens" in protocol.METHODS


def test_bad_settings_and_models_refused() -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    with pytest.raises(TypeError, match="no setting"):
        GraceEditor(model, tok, task="causal-lm", eps_init=1.0)
    for bad in (
        {"replacement": "replace_first"},
        {"eps_expand": "decay"},
        {"val_init": "hot"},
        {"n_iter": 0},
        {"eps": -1.0},
        {"edit_lr": 0.0},
        {"layer": 5},
    ):
        with pytest.raises(ValueError):
            GraceEditor(model, tok, task="causal-lm", **bad)
    with pytest.raises(ValueError, match="causal-lm"):
        GraceEditor(model, tok, task="seq2seq")
    with pytest.raises(ValueError, match="unknown task"):
        GraceEditor(model, tok, task="lm")
    with pytest.raises(UnsupportedModelError, match="llama"):
        GraceEditor(make_model("t5"), make_tokenizer("t5"), task="causal-lm")
    editor = GraceEditor(model, tok, task="causal-lm")
    with pytest.raises(InvalidEditError):
        editor.edit("", "paris")
    editor.close()
    assert not model._forward_pre_hooks  # no hook left behind by refused constructions
    assert not model.model.layers[1].mlp.down_proj._forward_hooks


@pytest.mark.parametrize("kind", ["gpt2", "gemma3"])
def test_other_causal_architectures(kind: str) -> None:
    """GPT-2 (Conv1D down-projection with a bias) and Gemma 3: exact replay, edit applied."""
    model, tok = make_model(kind), make_tokenizer(kind)
    editor = GraceEditor(model, tok, task="causal-lm", n_iter=5)
    outcome = editor.edit(*EDITS[0])
    assert outcome.details["tail"] is True and outcome.details["steps"] == 5
    assert editor.size == 1
    editor.close()


@pytest.mark.slow
def test_real_smollm2_edits_and_unrelated_prompts() -> None:
    """Two real edits on SmolLM2-135M (CPU, ~30 s; layer 25 of 30): they take, greedy
    generation reproduces them and unrelated prompts keep exactly the base logits."""
    from tpatcher import load_model

    model, tok = load_model("smollm2-135m")
    unrelated = ["The weather in Paris today is", "The capital of Germany is"]
    base = logits_of(model, tok, unrelated)
    editor = GraceEditor(model, tok, task="causal-lm")
    assert editor.settings()["layer_path"] == "model.layers.25.mlp.down_proj"
    edits = [
        ("David Robinson professionally plays the sport", "baseball"),
        ("Pete La Roca plays", "fantasy"),
    ]
    for prompt, target in edits:
        assert editor.edit(prompt, target).success
    assert torch.equal(logits_of(model, tok, unrelated), base)
    for prompt, target in edits:
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=1, do_sample=False)
        assert tok.decode(out[0, enc["input_ids"].shape[1] :]).strip() == target
    editor.close()
