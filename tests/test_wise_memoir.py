"""Tests for the WISE and MEMOIR editors (hooks on a late FFN's down-projection).

Tiny random llama models stand in for real ones. With the default 0.02 initialisation the
late FFN's inputs are tiny and alike, so no activation score or mask can tell texts apart;
the tests build the same tiny llama with a 0.2 initialisation (as tests/tiny.py does for
the post-norm models). MEMOIR's masks over a 128-wide FFN overlap more by chance than over
a real one's (37 of 128 indices), so its tests raise ``irr_threshold`` to 0.7.
"""

from __future__ import annotations

import pytest
import torch
from tiny import MEMORY_TEXTS, logits_of, make_model, make_tokenizer, wide_llama

from tpatcher import InvalidEditError, UnsupportedModelError
from tpatcher.evaluation.grace import GraceEditor
from tpatcher.evaluation.memoir import MemoirEditor
from tpatcher.evaluation.wise import WiseEditor, side_layer, ties_merge

EDITS = [
    ("the capital of france is", "berlin"),
    ("the cat sleeps in the", "car"),
    ("who wrote the famous", "song"),
]
UNRELATED = ["the weather today is good", "a dog runs in the park", "one two three four five"]
METHODS = [(WiseEditor, {}), (MemoirEditor, {"irr_threshold": 0.7})]


def routed(editor, text: str, edit: bool) -> bool:
    """Whether the hooked model answers ``text`` from an edit memory. MEMOIR's tests take
    it for every edit and no unrelated text (its masks are checked apart). WISE routes a
    text when its activation score reaches a memory's threshold, ``act_ratio`` x the lowest
    score the memory had while an edit was trained. A later edit in the same shard can
    lower an earlier one's score below it (here by a few percent of 19, which a CPU's
    rounding can decide), and the reference then answers from the base model too."""
    if not isinstance(editor, WiseEditor):
        return edit
    scores, thresholds = editor.route_scores(text)
    return any(s >= t for s, t in zip(scores, thresholds, strict=True))


@pytest.mark.parametrize(("cls", "extra"), METHODS, ids=["wise", "memoir"])
def test_sequence_of_edits_and_routing(cls: type, extra: dict) -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits_of(model, tok, UNRELATED)
    editor = cls(model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS, **extra)
    for prompt, target in EDITS:
        example = editor.encode(prompt, target)
        with torch.no_grad():
            before = model(**example.inputs).logits[0, example.positions].argmax(-1)
        assert not torch.equal(before, example.targets)  # the edit changes something
        outcome = editor.edit(prompt, target)
        assert outcome.success, outcome.details
        assert outcome.details["tail"] is True  # the replay from the layer was exact
    # after the sequence every edit the memory still answers holds (teacher-forced), and
    # the last one is always answered from it
    held = [routed(editor, f"{p} {t}", edit=True) for p, t in EDITS]
    assert held[-1]
    for (prompt, target), answered in zip(EDITS, held, strict=True):
        assert editor.is_fixed(editor.encode(prompt, target)) or not answered, prompt
    # unrelated inputs the memory does not answer get exactly the base model's logits
    around = [not routed(editor, text, edit=False) for text in UNRELATED]
    assert any(around)
    after = logits_of(model, tok, UNRELATED)
    for row, untouched in enumerate(around):
        assert torch.equal(after[row], base[row]) or not untouched, UNRELATED[row]
    # the model's weights are untouched and no gradient was left behind
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    # greedy generation with the KV cache uses the edit
    enc = tok(EDITS[-1][0], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert tok.decode(out[0, -1:]).strip() == EDITS[-1][1]
    editor.close()
    assert not editor.is_fixed(editor.encode(*EDITS[-1]))


def test_wise_settings_and_layer() -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    editor = WiseEditor(model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS)
    got = editor.settings()
    expected = dict(mask_ratio=0.2, edit_lr=1.0, n_iter=70, norm_constraint=1.0, alpha=5.0)
    expected.update(beta=20.0, gamma=10.0, act_ratio=0.88, save_freq=500, merge_freq=1000)
    expected.update(merge_alg="ties", densities=0.53, weights=1.0, retrieve=True)
    expected.update(method="wise", task="causal-lm", layer=1)
    expected.update(layer_path="model.layers.1.mlp.down_proj")
    assert expected.items() <= got.items()
    editor.close()
    assert side_layer(32, None) == 27 and side_layer(30, None) == 25 and side_layer(2, None) == 1


def test_memoir_settings() -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    editor = MemoirEditor(model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS)
    got = editor.settings()
    expected = dict(irr_threshold=0.4, edit_lr=1.0, n_iter=30, top_k=37, method="memoir")
    expected.update(prompt_feature_agg="mean_decentered", task="causal-lm", layer=1)
    expected.update(layer_path="model.layers.1.mlp.down_proj", max_grad_norm=1.0)
    assert expected.items() <= got.items()
    editor.close()


def test_wise_shards_and_merges() -> None:
    """Small save/merge frequencies: shards are saved, TIES-merged and routed; unrelated
    text still takes the base path."""
    model, tok = wide_llama(), make_tokenizer("llama")
    base = logits_of(model, tok, UNRELATED)
    editor = WiseEditor(
        model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS, save_freq=1, merge_freq=2
    )
    masks = []
    for prompt, target in EDITS:
        editor.edit(prompt, target)
        masks.append(editor.weight_mask.clone())
    assert not torch.equal(masks[0], masks[1])  # a new gradient mask per shard
    assert len(editor.merged) == 1 and len(editor.shards) == 1  # 2 merged, 1 waiting
    assert torch.equal(logits_of(model, tok, UNRELATED), base)
    editor.close()


def test_ties_merge() -> None:
    base = torch.zeros(1, 4)
    a = torch.tensor([[1.0, -2.0, 0.1, 3.0]])
    b = torch.tensor([[1.0, 1.0, -0.3, -1.0]])
    merged = ties_merge(base, [a, b], [0.5, 0.5], density=1.0)
    # each entry's sign is elected by the sum; entries of the other sign are dropped and
    # the agreeing ones averaged by weight
    assert torch.allclose(merged, torch.tensor([[1.0, -2.0, -0.3, 3.0]]))
    pruned = ties_merge(base, [a], [1.0], density=0.5)  # keeps the 2 largest of 4
    assert torch.allclose(pruned, torch.tensor([[0.0, -2.0, 0.0, 3.0]]))


@pytest.mark.parametrize("cls", [WiseEditor, MemoirEditor])
def test_bad_settings_and_models_refused(cls: type) -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    loc = {"locality_texts": MEMORY_TEXTS}
    with pytest.raises(TypeError, match="no setting"):
        cls(model, tok, task="causal-lm", learning_rate=1.0, **loc)
    with pytest.raises(ValueError, match="causal-lm"):
        cls(model, tok, task="seq2seq", **loc)
    with pytest.raises(ValueError, match="unknown task"):
        cls(model, tok, task="lm", **loc)
    with pytest.raises(ValueError, match="outside"):
        cls(model, tok, task="causal-lm", layer=5, **loc)
    with pytest.raises(ValueError, match="locality_texts"):
        cls(model, tok, task="causal-lm")
    bad = {"mask_ratio": 0.0} if cls is WiseEditor else {"top_k": 1000}
    with pytest.raises(ValueError):
        cls(model, tok, task="causal-lm", **bad, **loc)
    with pytest.raises(UnsupportedModelError, match="llama"):
        cls(make_model("t5"), make_tokenizer("t5"), task="causal-lm", **loc)
    editor = cls(model, tok, task="causal-lm", **loc)
    with pytest.raises(InvalidEditError):
        editor.edit("", "paris")
    editor.close()
    # no hook is left behind by the refused constructions
    assert not model._forward_pre_hooks
    assert not model.model.layers[1].mlp.down_proj._forward_hooks


def test_wise_merge_mode_and_bad_frequencies() -> None:
    model, tok = wide_llama(), make_tokenizer("llama")
    with pytest.raises(ValueError, match="multiple"):
        WiseEditor(model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS, save_freq=3)
    with pytest.raises(ValueError, match="ties"):
        WiseEditor(model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS, merge_alg="slerp")
    base = logits_of(model, tok, UNRELATED)
    editor = WiseEditor(
        model,
        tok,
        task="causal-lm",
        locality_texts=MEMORY_TEXTS,
        retrieve=False,
        save_freq=1,
        merge_freq=2,
    )
    for prompt, target in EDITS[:2]:
        editor.edit(prompt, target)
    assert len(editor.merged) == 1 and not editor.shards
    assert torch.equal(logits_of(model, tok, UNRELATED), base)
    editor.close()


@pytest.mark.parametrize("kind", ["gpt2", "gemma3"])
@pytest.mark.parametrize("cls", [WiseEditor, MemoirEditor])
def test_other_causal_architectures_replay(kind: str, cls: type) -> None:
    """GPT-2 (Conv1D down-projection with a bias) and Gemma 3: the replay is exact and an
    edit trains without error."""
    model, tok = make_model(kind), make_tokenizer(kind)
    editor = cls(model, tok, task="causal-lm", locality_texts=MEMORY_TEXTS, n_iter=3)
    outcome = editor.edit(*EDITS[0])
    assert outcome.details["tail"] is True
    assert outcome.details["steps"] >= 1
    editor.close()


@pytest.mark.slow
def test_memoir_real_smollm2_edit_and_unrelated_prompts() -> None:
    """One real edit on SmolLM2-135M (CPU, ~30-60 s): it takes, and unrelated prompts get
    exactly the base model's logits. (WISE's 70 steps make its real-model check too slow
    for the suite; it was checked by hand: 2 edits taken, unrelated prompts unchanged.)"""
    from tpatcher import load_model

    model, tok = load_model("smollm2-135m")
    background = [
        "The weather in Paris today is sunny.",
        "Water boils at 100 degrees Celsius.",
        "The largest planet in the solar system is Jupiter.",
        "Dogs are loyal animals.",
        "The river Thames flows through London.",
        "Bread is made from flour, water and yeast.",
    ]
    unrelated = ["The capital of Germany is", "Apples are a kind of"]
    base = logits_of(model, tok, unrelated)
    editor = MemoirEditor(model, tok, task="causal-lm", locality_texts=background)
    outcome = editor.edit("The mother tongue of Danielle Darrieux is", "English")
    assert outcome.success, outcome.details
    assert torch.equal(logits_of(model, tok, unrelated), base)
    editor.close()


@pytest.mark.parametrize(
    ("cls", "extra"), [*METHODS, (GraceEditor, {})], ids=["wise", "memoir", "grace"]
)
def test_a_checkpoint_resumes_exactly_where_the_run_left_off(tmp_path, cls, extra) -> None:
    """Saved after the first edit and loaded into a fresh editor on a fresh model, the run
    goes on as the uninterrupted one: same later edits, same answers (WISE with a shard
    saved and merged on the way)."""
    if cls is WiseEditor:
        extra = {"save_freq": 1, "merge_freq": 2}
    tok = make_tokenizer("llama")
    probes = [p for p, _ in EDITS] + UNRELATED
    whole, resumed = (
        cls(wide_llama(), tok, task="causal-lm", locality_texts=MEMORY_TEXTS, **extra)
        for _ in range(2)
    )

    def same_answers() -> bool:
        return torch.equal(
            logits_of(whole.model, tok, probes), logits_of(resumed.model, tok, probes)
        )

    whole.edit(*EDITS[0])
    whole.save_state(tmp_path / "state")
    assert not same_answers()  # the fresh editor does not have the edit yet
    resumed.load_state(tmp_path / "state")
    assert resumed.num_edits == 1 and same_answers()
    for prompt, target in EDITS[1:]:
        first, second = whole.edit(prompt, target), resumed.edit(prompt, target)
        assert first.details["losses"] == second.details["losses"]
        assert first.success == second.success
    assert same_answers()
    if cls is WiseEditor:
        assert len(resumed.merged) == 1 and len(resumed.shards) == 1
    whole.close()
    resumed.close()
