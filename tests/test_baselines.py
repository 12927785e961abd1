"""Tests for the baseline editors (FT-L, FT+KL, grace-tokens: the per-token GRACE variant).

The behaviour that matters is tested on the real SmolLM2-135M with CounterFact edits (the
shared data folder's, or made-up ones in its format where a clone has none); every
architecture's tail and the classifier path run on tiny random models. CPU time is dominated
by full forward passes, so each real-model test makes few edits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import ARCHITECTURES, MEMORY_TEXTS, make_model, make_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from tpatcher import InvalidEditError, Patcher, load_model
from tpatcher.encoding import encode_edit
from tpatcher.evaluation.baselines import FTEditor, FTKLEditor, GraceTokensEditor

TASK_OF = {"bert": "seq-cls", "t5": "seq2seq", "t5-gated": "seq2seq", "bart": "seq2seq"}


@pytest.fixture(scope="module")
def records(data_dir: Path) -> list[dict]:
    return json.loads((data_dir / "counterfact" / "counterfact-edit-1k.json").read_text())[:40]


@pytest.fixture(scope="module")
def locality(records: list[dict]) -> list[str]:
    """Locality prompts of other records: the FT+KL pool (disjoint from measured ones)."""
    return [r["locality_prompt"] for r in records[10:18]]


def smollm():
    return load_model("smollm2-135m")


def flags(model: torch.nn.Module) -> tuple[list[bool], list[bool]]:
    return [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]


def last_logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Next-token logits after each text (one padded batch, right padding)."""
    tokenizer.padding_side = "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    last = enc["attention_mask"].sum(1) - 1
    return logits[torch.arange(len(texts)), last]


# --------------------------------------------------------------------------------------------
# encoding
# --------------------------------------------------------------------------------------------


def _same(a, b) -> None:
    assert set(a.inputs) == set(b.inputs)
    for key in a.inputs:
        assert torch.equal(a.inputs[key], b.inputs[key]), key
    assert torch.equal(a.positions, b.positions)
    assert torch.equal(a.targets, b.targets)


@pytest.mark.slow
def test_encode_edit_matches_patcher_on_smollm(records: list[dict]) -> None:
    model, tok = smollm()
    patcher = Patcher(model, tok, memory_texts=[])
    try:
        cases = [(r["prompt"], r["target_new"]) for r in records[:3]]
        cases += [("The capital of France is ", "Paris"), ("Q:", " two words")]
        for prompt, target in cases:
            ours = encode_edit(tok, model, prompt, target, task="causal-lm")
            _same(ours, patcher.encode(prompt, target))
    finally:
        patcher.close()


@pytest.mark.parametrize("kind", ["t5", "bart", "bert"])
def test_encode_edit_matches_patcher_on_other_tasks(kind: str) -> None:
    model, tok = make_model(kind), make_tokenizer(kind)
    patcher = Patcher(model, tok, memory_texts=["the cat"])
    try:
        target = 2 if kind == "bert" else "paris is big"
        ours = encode_edit(tok, model, "the capital of france", target, task=TASK_OF[kind])
        _same(ours, patcher.encode("the capital of france", target))
    finally:
        patcher.close()


# --------------------------------------------------------------------------------------------
# FT-L and FT+KL on the real model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ft_fixes_sequential_real_edits_and_restores_flags(records: list[dict]) -> None:
    model, tok = smollm()
    model.train()  # the editor must hand back whatever mode it was given
    model.model.layers[0].eval()
    before = flags(model)
    editor = FTEditor(model, tok, task="causal-lm")
    edits = [(r["prompt"], r["target_new"]) for r in records[:2]]
    for prompt, target in edits:
        outcome = editor.edit(prompt, target)
        assert outcome.success, outcome.details
        assert outcome.details["tail"] is True
        assert 0 < outcome.details["steps"] <= editor.config.max_steps
    assert flags(model) == before
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    # the later edit did not undo the earlier one here (not guaranteed in general for FT)
    assert editor.is_fixed(editor.encode(*edits[-1]))
    assert editor.settings()["lr"] == 5e-4 and editor.settings()["method"] == "ft-l"


@pytest.mark.slow
def test_ft_kl_changes_locality_less_than_ft(records: list[dict], locality: list[str]) -> None:
    measured = [r["locality_prompt"] for r in records[:6]]
    prompt, target = records[0]["prompt"], records[0]["target_new"]
    changes = {}
    for cls in (FTEditor, FTKLEditor):
        model, tok = smollm()
        base = last_logits(model, tok, measured + locality[:4])
        editor = cls(model, tok, task="causal-lm", locality_texts=locality, lr=5e-4)
        outcome = editor.edit(prompt, target)
        assert outcome.success, outcome.details
        after = last_logits(model, tok, measured + locality[:4])
        kl = torch.nn.functional.kl_div(
            after.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        changes[cls.name] = (kl[: len(measured)].mean().item(), kl[len(measured) :].mean().item())
    # on the KL pool itself, and on held-out locality prompts
    assert changes["ft+kl"][1] < changes["ft-l"][1], changes
    assert changes["ft+kl"][0] < changes["ft-l"][0], changes


# --------------------------------------------------------------------------------------------
# GRACE on the real model
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grace_real_edits_exact_locality_and_generation(records: list[dict]) -> None:
    model, tok = smollm()
    before = flags(model)
    weights = {k: v.clone() for k, v in model.model.layers[-1].mlp.state_dict().items()}
    unrelated = ["The weather in Paris today is", records[30]["locality_prompt"]]
    base = last_logits(model, tok, unrelated)
    editor = GraceTokensEditor(model, tok, task="causal-lm")
    edits = [(r["prompt"], r["target_new"]) for r in records[:2]]
    for prompt, target in edits:
        outcome = editor.edit(prompt, target)
        assert outcome.success, outcome.details
        assert outcome.details["new_keys"] >= 1
    assert editor.size >= 2
    assert all(editor.is_fixed(editor.encode(p, t)) for p, t in edits)  # none was undone
    assert torch.equal(last_logits(model, tok, unrelated), base)  # exactly unchanged
    assert flags(model) == before
    for k, v in model.model.layers[-1].mlp.state_dict().items():
        assert torch.equal(v, weights[k])
    # greedy generation with the KV cache reproduces the edit
    prompt, target = edits[0]
    enc = tok(prompt, return_tensors="pt")
    n_target = len(tok(" " + target, add_special_tokens=False)["input_ids"])
    out = model.generate(**enc, max_new_tokens=n_target, do_sample=False)
    assert tok.decode(out[0, enc["input_ids"].shape[1] :]).strip() == target
    editor.close()
    assert not editor.is_fixed(editor.encode(prompt, target))


# --------------------------------------------------------------------------------------------
# codebook rules (tiny model, hand-placed keys)
# --------------------------------------------------------------------------------------------


def test_grace_codebook_rules() -> None:
    model, tok = make_model("llama"), make_tokenizer("llama")
    editor = GraceTokensEditor(model, tok, task="causal-lm", eps_init=1.0)
    d = 64
    key = torch.zeros(d)
    value = torch.ones(d)
    editor._update_codebook(key, value, label=5)
    assert editor.size == 1 and editor.radii == [1.0]
    far = torch.zeros(d)
    far[0] = 3.0  # beyond eps_init + radius: a new key
    editor._update_codebook(far, value, label=5)
    assert editor.size == 2
    near_same = torch.zeros(d)
    near_same[1] = 1.5  # within reach of key 0, same label: its radius grows to cover it
    editor._update_codebook(near_same, value, label=5)
    assert editor.size == 2 and editor.radii[0] == pytest.approx(1.5)
    conflict = torch.zeros(d)
    conflict[2] = 1.2  # within reach of key 0, other label: both radii halve
    editor._update_codebook(conflict, value, label=7)
    assert editor.size == 3
    assert editor.radii[0] == pytest.approx(0.6, abs=1e-4)
    assert editor.radii[2] == pytest.approx(0.6)
    assert editor.radii[0] + editor.radii[2] <= 1.2
    editor.close()


# --------------------------------------------------------------------------------------------
# every architecture, tiny random models
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("cls", [FTEditor, GraceTokensEditor])
def test_tiny_architectures(kind: str, cls: type) -> None:
    model, tok = make_model(kind), make_tokenizer(kind)
    task = TASK_OF.get(kind, "causal-lm")
    target = 1 if task == "seq-cls" else "paris"
    extra = {"lr": 1e-2} if cls is FTEditor else {}
    editor = cls(model, tok, task=task, **extra)
    example = editor.encode("the capital of france is", target)
    with torch.no_grad():
        logits = editor._full_logits(example)
    if bool((logits.argmax(-1) == example.targets).all()):
        target = 2 if task == "seq-cls" else "berlin"
    outcome = editor.edit("the capital of france is", target)
    assert editor._tail_ok is True  # the cached tail reproduces this architecture exactly
    assert outcome.success, (kind, outcome.details)
    assert not any(p.requires_grad is False for p in model.parameters())
    assert not model.training


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_ft_kl_locality_captures_replay_exactly(kind: str) -> None:
    """The batched locality captures feed the site's one replay: it must reproduce them."""
    model, tok = make_model(kind), make_tokenizer(kind)
    tok.padding_side = "left"
    texts = MEMORY_TEXTS[:5]
    editor = FTKLEditor(model, tok, task=TASK_OF.get(kind, "causal-lm"), locality_texts=texts)
    assert tok.padding_side == "left"  # restored after the right-padded batches
    assert len(editor._locality) == len(texts)
    for text, item in zip(texts, editor._locality, strict=True):
        assert editor.site.replay_matches(item.tail)
        tokens = 1 if kind == "bert" else len(tok(text)["input_ids"])
        assert item.tail.q.shape[0] == item.ref_logp.shape[0] == tokens  # real tokens only


def test_ft_kl_tiny_classifier_with_minilm_tokenizer() -> None:
    _, tok = load_model("minilm-l6", task="seq-cls", num_labels=2)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_labels=2,
        initializer_range=0.2,
    )
    model = BertForSequenceClassification(config).eval()
    texts = ["Paris is in France.", "The sky is green.", "Dogs are mammals.", "Ice is hot."]
    editor = FTKLEditor(model, tok, task="seq-cls", locality_texts=texts, lr=1e-2)
    text = "Toko Yasuda plays the piano."
    with torch.no_grad():
        label = 1 - int(model(**tok(text, return_tensors="pt")).logits.argmax(-1))
    outcome = editor.edit(text, label)
    assert outcome.success, outcome.details
    with torch.no_grad():
        assert int(model(**tok(text, return_tensors="pt")).logits.argmax(-1)) == label
    grace = GraceTokensEditor(model, tok, task="seq-cls")
    assert grace.edit(text, 1 - label).success
    grace.close()


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_errors() -> None:
    model, tok = make_model("llama"), make_tokenizer("llama")
    editor = FTEditor(model, tok, task="causal-lm")
    for prompt, target in [("", "paris"), ("   ", "paris"), ("the capital", ""), ("x", " ")]:
        with pytest.raises(ValueError):
            editor.edit(prompt, target)
    with pytest.raises(InvalidEditError):
        GraceTokensEditor(model, tok, task="causal-lm").edit("", "paris")
    with pytest.raises(TypeError, match="no setting"):
        FTEditor(model, tok, task="causal-lm", learning_rate=1.0)
    with pytest.raises(ValueError, match="does not match"):
        FTEditor(model, tok, task="seq-cls")
    with pytest.raises(ValueError, match="unknown task"):
        FTEditor(model, tok, task="lm")
    with pytest.raises(ValueError, match="locality_texts"):
        FTKLEditor(model, tok, task="causal-lm")
