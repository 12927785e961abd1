"""Unit tests of the Patcher on tiny random models of every supported architecture."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import ARCHITECTURES, MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import (
    InvalidEditError,
    PatchDirectoryError,
    Patcher,
    PatcherConfig,
    TrainingError,
    UnknownEditError,
    UnsupportedModelError,
)
from tpatcher.config import neuron_activation_from_word

PROMPT = "the capital of france is"
OTHER = ["the weather today is good", "who wrote the famous novel", "the cat sleeps in the house"]


def make_patcher(kind: str, **config) -> Patcher:
    model = make_model(kind)
    return Patcher(model, make_tokenizer(kind), PatcherConfig(**config), memory_texts=MEMORY_TEXTS)


def edit_args(patcher: Patcher, text: str = PROMPT) -> tuple[str, str | int]:
    """An edit the tiny model gets wrong: another label, or the word 'berlin'."""
    if patcher.task == "seq-cls":
        return "the capital of france is paris", (
            patcher.classify("the capital of france is paris") + 1
        ) % 3
    return text, "berlin"


def logits(patcher: Patcher, text: str) -> torch.Tensor:
    """Full output logits of the (patched) model for ``text``."""
    enc = patcher.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        if patcher.task == "seq2seq":
            dec = patcher.model.prepare_decoder_input_ids_from_labels(labels=enc["input_ids"])
            return patcher.model(**enc, decoder_input_ids=dec).logits
        return patcher.model(**enc).logits


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_edit_fixes_the_mistake_and_keeps_other_outputs(kind: str) -> None:
    patcher = make_patcher(kind)
    prompt, target = edit_args(patcher)
    assert patcher.is_mistake(prompt, target)
    before = {t: logits(patcher, t) for t in OTHER + MEMORY_TEXTS[:3]}
    result = patcher.edit(prompt, target)
    assert result.success, result.message
    assert 1 <= result.neurons <= patcher.config.max_neurons_per_edit
    assert not patcher.is_mistake(prompt, target)
    assert patcher.num_neurons == result.neurons
    for text, old in before.items():
        new = logits(patcher, text)
        change = float((new.softmax(-1) - old.softmax(-1)).abs().max())
        assert change < 0.01, (text, change)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_rollback_restores_exact_logits(kind: str) -> None:
    patcher = make_patcher(kind)
    prompt, target = edit_args(patcher)
    base = logits(patcher, prompt)
    first = patcher.edit(prompt, target)
    after_first = logits(patcher, OTHER[0])
    if patcher.task == "seq-cls":
        text = "the weather today is good"
        second = patcher.edit(text, label=(patcher.classify(text) + 1) % 3)
    else:
        second = patcher.edit("the capital of italy is", "tokyo")
    assert first.success and second.success
    patcher.rollback(second.edit_id)
    assert torch.equal(logits(patcher, OTHER[0]), after_first)
    patcher.rollback(first.edit_id)
    assert patcher.num_neurons == 0
    assert torch.equal(logits(patcher, prompt), base)
    with pytest.raises(UnknownEditError):
        patcher.rollback(first.edit_id)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_save_load_round_trip_is_exact(kind: str, tmp_path) -> None:
    patcher = make_patcher(kind)
    result = patcher.edit(*edit_args(patcher))
    assert result.success
    expected = logits(patcher, PROMPT)
    patcher.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [e["id"] for e in manifest["edits"]] == [result.edit_id]
    assert manifest["fingerprint"] == patcher.fingerprint
    patcher.close()

    fresh = make_model(kind)  # same seed: same base weights
    loaded = Patcher.load(fresh, make_tokenizer(kind), tmp_path, memory_texts=MEMORY_TEXTS)
    assert [e.edit_id for e in loaded.edits] == [result.edit_id]
    assert torch.equal(logits(loaded, PROMPT), expected)
    # the loaded patcher keeps editing, and its memory holds the loaded edit
    assert len(loaded.memory) == len(patcher.memory)


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_merge_gives_the_patched_logits(kind: str) -> None:
    patcher = make_patcher(kind, neuron_activation=None)  # the FFN's own: foldable
    assert patcher.edit(*edit_args(patcher)).success
    patched = {t: logits(patcher, t) for t in [PROMPT, *OTHER]}
    merged = patcher.merge()
    assert not merged._forward_hooks
    for text, expected in patched.items():
        enc = patcher.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            if patcher.task == "seq2seq":
                dec = merged.prepare_decoder_input_ids_from_labels(labels=enc["input_ids"])
                out = merged(**enc, decoder_input_ids=dec).logits
            else:
                out = merged(**enc).logits
        # float32 rounding of the folded weights (the README's exactness: within 1e-4)
        assert torch.allclose(out, expected, atol=1e-4), float((out - expected).abs().max())
    # the patcher still works after merging
    assert torch.equal(logits(patcher, PROMPT), patched[PROMPT])


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_cached_and_full_loops_give_the_same_neurons(kind: str) -> None:
    # In float64, so rounding (which Adam amplifies step after step) cannot hide a real
    # difference. The cached loop stops by itself after S steps; the full loop then runs
    # exactly S steps, since the stopping tests compare floats with thresholds and a rounding
    # difference could otherwise stop one loop a step before the other.
    def run(loop: str, **config):
        model = make_model(kind).double()
        settings = PatcherConfig(training_loop=loop, **config)
        patcher = Patcher(model, make_tokenizer(kind), settings, memory_texts=MEMORY_TEXTS)
        result = patcher.edit(*edit_args(patcher))
        assert result.success, (loop, result.message)
        return result.steps, patcher.neurons

    steps, cached = run("cached")
    _, full = run("full", max_steps=steps, early_stop=False)
    for name in ("keys", "values", "up_keys", "biases"):
        a, b = getattr(cached, name), getattr(full, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), (name, float((a - b).abs().max()))


def test_disable_enable_and_context_manager() -> None:
    patcher = make_patcher("llama")
    base = logits(patcher, PROMPT)
    assert patcher.edit(PROMPT, "berlin").success
    patched = logits(patcher, PROMPT)
    with patcher.disabled():
        assert torch.equal(logits(patcher, PROMPT), base)
    assert torch.equal(logits(patcher, PROMPT), patched)
    patcher.disable()
    assert torch.equal(logits(patcher, PROMPT), base)
    patcher.enable()
    assert torch.equal(logits(patcher, PROMPT), patched)


def test_generate_uses_the_patch() -> None:
    patcher = make_patcher("llama")
    assert patcher.edit(PROMPT, "berlin").success
    assert patcher.generate(PROMPT, 1).strip() == "berlin"
    enc = patcher.tokenizer(PROMPT, return_tensors="pt")
    out = patcher.model.generate(**enc, max_new_tokens=1, do_sample=False)
    assert patcher.tokenizer.decode(out[0, -1]) == "berlin"


def test_already_correct_input_is_not_edited() -> None:
    patcher = make_patcher("llama")
    answer = patcher.generate(PROMPT, 1).strip()
    result = patcher.edit(PROMPT, answer)
    assert result.already_correct and result.success and result.edit_id is None
    assert patcher.num_neurons == 0 and not patcher.edits


def test_sequential_edits_all_hold() -> None:
    patcher = make_patcher("llama")
    facts = [
        ("the capital of france is", "berlin"),
        ("the capital of italy is", "tokyo"),
        ("the largest river is", "moon"),
        ("the composer of the song was", "queen"),  # not in the memory bank
    ]
    for prompt, target in facts:
        assert patcher.edit(prompt, target).success
    for prompt, target in facts:
        assert not patcher.is_mistake(prompt, target), prompt
    assert len(patcher.edits) == 4


def test_one_neuron_per_wrong_target_token_up_to_the_cap() -> None:
    target = "moon river star book"  # four tokens the tiny model gets wrong
    patcher = make_patcher("llama")
    assert patcher.edit(PROMPT, target).neurons == 4
    # SiLU neurons reach the two uncovered tokens through their tails; ReLU neurons cannot,
    # which is why the default cap is well above the reference implementation's 5
    capped = make_patcher(  # the paper's form: SiLU neurons trained at full strength
        "llama", max_neurons_per_edit=2, neuron_activation=None, edit_headroom=1.0
    )
    result = capped.edit(PROMPT, target)
    assert result.neurons <= 2 and capped.num_neurons == result.neurons
    assert result.success and result.neurons == 2
    relu = make_patcher("llama", max_neurons_per_edit=2)
    failed = relu.edit(PROMPT, target)
    assert not failed.success and relu.num_neurons == 0


def test_failed_edit_leaves_no_neurons() -> None:
    patcher = make_patcher("llama", max_steps=1, lr=1e-6)
    before = logits(patcher, PROMPT)
    result = patcher.edit(PROMPT, "berlin")
    assert not result.success and result.edit_id is None and result.neurons == 0
    assert patcher.num_neurons == 0 and not patcher.edits
    assert torch.equal(logits(patcher, PROMPT), before)


@pytest.mark.parametrize(
    ("prompt", "target", "message"),
    [
        ("", "berlin", "prompt is empty"),
        ("   ", "berlin", "prompt is empty"),
        (PROMPT, "", "target is empty"),
        (PROMPT, " ", "target is empty"),
        (" ".join(["the"] * 200), "berlin", "longer than the model's context"),
    ],
)
def test_bad_generation_input_is_refused_and_changes_nothing(prompt, target, message) -> None:
    patcher = make_patcher("llama")
    assert patcher.edit(PROMPT, "berlin").success
    state = patcher.neurons
    with pytest.raises(InvalidEditError, match=message):
        patcher.edit(prompt, target)
    assert patcher.neurons is state and len(patcher.edits) == 1


def test_target_that_tokenises_to_nothing_is_refused() -> None:
    patcher = make_patcher("llama")
    real = patcher.tokenizer

    class Empty:  # a tokenizer that yields no ids for the target
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, text, **kwargs):
            out = real(text, **kwargs)
            if kwargs.get("add_special_tokens") is False:
                out["input_ids"] = []
            return out

    patcher.tokenizer = Empty()
    with pytest.raises(InvalidEditError, match="tokenises to nothing"):
        patcher.edit(PROMPT, "berlin")


def test_classifier_label_outside_the_head_is_refused() -> None:
    patcher = make_patcher("bert")
    for bad in (3, -1, "maybe", 1.5):
        with pytest.raises(InvalidEditError):
            patcher.edit("the cat sleeps", label=bad)
    assert patcher.num_neurons == 0


def test_nan_during_training_raises_and_changes_nothing() -> None:
    patcher = make_patcher("llama", value_amplifier_init=float("nan"))
    before = logits(patcher, PROMPT)
    with pytest.raises(TrainingError, match="nan"):
        patcher.edit(PROMPT, "berlin")
    assert patcher.num_neurons == 0
    assert torch.equal(logits(patcher, PROMPT), before)


def test_patch_for_another_model_is_refused(tmp_path) -> None:
    patcher = make_patcher("llama")
    assert patcher.edit(PROMPT, "berlin").success
    patcher.save(tmp_path)
    other = make_model("llama", seed=1)
    with pytest.raises(PatchDirectoryError, match="not for this model"):
        Patcher.load(other, make_tokenizer("llama"), tmp_path)
    assert not other._forward_hooks and not other.model.layers[-1].mlp._forward_hooks


def test_damaged_patch_directory_is_refused_and_left_alone(tmp_path) -> None:
    patcher = make_patcher("llama")
    result = patcher.edit(PROMPT, "berlin")
    patcher.save(tmp_path)
    edit_file = tmp_path / "edits" / f"{result.edit_id}.safetensors"
    data = bytearray(edit_file.read_bytes())
    data[-1] ^= 0xFF
    edit_file.write_bytes(bytes(data))
    snapshot = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(PatchDirectoryError, match="damaged"):
        Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PatchDirectoryError, match="damaged"):
        Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path)
    assert snapshot[edit_file] == edit_file.read_bytes()
    with pytest.raises(PatchDirectoryError, match="not a patch directory"):
        Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path / "missing")


def test_save_is_incremental_and_drops_rolled_back_edits(tmp_path) -> None:
    patcher = make_patcher("llama")
    first = patcher.edit(PROMPT, "berlin")
    patcher.save(tmp_path)
    first_file = tmp_path / "edits" / f"{first.edit_id}.safetensors"
    mtime = first_file.stat().st_mtime_ns
    second = patcher.edit("the capital of italy is", "tokyo")
    patcher.save(tmp_path)
    assert first_file.stat().st_mtime_ns == mtime  # unchanged edits are not rewritten
    patcher.rollback(first.edit_id)
    patcher.save(tmp_path)
    assert not first_file.exists()
    names = sorted(p.name for p in (tmp_path / "edits").iterdir())
    assert names == [f"{second.edit_id}.safetensors"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_unsupported_architecture_is_named() -> None:
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1))
    with pytest.raises(UnsupportedModelError, match="mamba"):
        Patcher(model, make_tokenizer("llama"))


def test_target_module_override() -> None:
    model = make_model("llama")
    tok = make_tokenizer("llama")
    patcher = Patcher(
        model, tok, PatcherConfig(target_module="model.layers.1.mlp"), memory_texts=MEMORY_TEXTS
    )
    assert patcher._site.block is model.model.layers[1]
    patcher.close()
    with pytest.raises(UnsupportedModelError, match="last FFN"):
        Patcher(model, tok, PatcherConfig(target_module="model.layers.0.mlp"))
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        Patcher(model, tok, PatcherConfig(target_module="model.nothing"))


def test_default_memory_can_join_the_users_memory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TPATCHER_CACHE", str(tmp_path))
    own = make_patcher("llama").memory
    generic = Patcher(make_model("llama"), make_tokenizer("llama")).memory
    both = make_patcher("llama", include_default_memory=True).memory
    assert both.base.shape[0] == own.base.shape[0] + generic.base.shape[0]
    assert torch.equal(both.base, torch.cat([own.base, generic.base]))
    assert both.source.startswith(own.source) and generic.source in both.source


def test_relu_neurons_are_exactly_silent_below_zero_and_survive_save_load(tmp_path) -> None:
    patcher = make_patcher("llama", neuron_activation="relu")  # the FFN itself uses SiLU
    assert (patcher.activation, patcher.ffn_activation) == ("relu", "silu")
    result = patcher.edit(*edit_args(patcher))
    assert result.success, result.message
    q = patcher.ffn_inputs(OTHER + MEMORY_TEXTS)
    state = patcher.neurons
    silent = (q @ state.keys.T <= 0).all(dim=1)
    assert silent.any()
    assert torch.equal(patcher.patch_output(q[silent]), torch.zeros_like(q[silent]))
    expected = logits(patcher, PROMPT)
    patcher.save(tmp_path)
    loaded = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path)
    assert loaded.activation == "relu"
    assert torch.equal(logits(loaded, PROMPT), expected)


def test_default_neurons_are_relu_on_silu_ffns_and_the_ffns_own_elsewhere() -> None:
    assert make_patcher("llama").activation == "relu"  # SiLU FFN
    assert make_patcher("llama", neuron_activation=None).activation == "silu"  # paper form
    gpt2 = make_patcher("gpt2")
    assert gpt2.activation == gpt2.ffn_activation == "gelu_new"
    gemma = make_patcher("gemma3")  # GELU, but the FFN's output has a norm of its own
    assert gemma.ffn_activation.startswith("gelu") and gemma.activation == "relu"
    assert make_patcher("gemma3", neuron_activation=None).activation == gemma.ffn_activation
    assert neuron_activation_from_word("ffn") is None  # the command-line spelling of None
    assert neuron_activation_from_word("relu") == "relu"


def test_a_patch_saved_under_an_earlier_meaning_of_auto_still_loads(tmp_path) -> None:
    patcher = make_patcher("gemma3", neuron_activation="gelu_pytorch_tanh")
    assert patcher.edit(*edit_args(patcher)).success
    expected = logits(patcher, PROMPT)
    patcher.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["config"]["neuron_activation"] = "auto"  # as saved when auto meant GELU here
    del manifest["checksum"]  # a hand-edited manifest must not carry a stale checksum
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loaded = Patcher.load(make_model("gemma3"), make_tokenizer("gemma3"), tmp_path)
    assert loaded.activation == "gelu_pytorch_tanh"
    assert torch.equal(logits(loaded, PROMPT), expected)


def test_patches_saved_before_neuron_activation_load_with_the_ffns_own(tmp_path) -> None:
    patcher = make_patcher("llama", neuron_activation=None)
    assert patcher.edit(*edit_args(patcher)).success
    expected = logits(patcher, PROMPT)
    patcher.save(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["activation"], manifest["config"]["neuron_activation"]  # the older format
    for later in ("edit_headroom", "memory_chat_answers", "activation_floor"):
        del manifest["config"][later]
    del manifest["config"]["floor_first_position_only"], manifest["config"]["memory_questions"]
    del manifest["checksum"]  # which had no manifest checksum either
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    loaded = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path)
    assert loaded.activation == "silu"
    assert torch.equal(logits(loaded, PROMPT), expected)
    # further edits are made as the saved ones were, not with today's defaults
    assert loaded.config.edit_headroom == 1.0 and loaded.config.memory_chat_answers == 0
    assert loaded.config.activation_floor == 0.0 and not loaded.config.floor_first_position_only
    assert not loaded.config.memory_questions and PatcherConfig().memory_questions
    assert PatcherConfig().edit_headroom != 1.0 and PatcherConfig().memory_chat_answers != 0
    assert PatcherConfig().resolved_activation_floor("causal-lm", "relu") != 0.0


def test_load_refuses_a_config_whose_neurons_differ_from_the_saved_ones(tmp_path) -> None:
    patcher = make_patcher("llama")  # ReLU neurons
    assert patcher.edit(*edit_args(patcher)).success
    patcher.save(tmp_path)
    model, tok = make_model("llama"), make_tokenizer("llama")

    def plain_logits() -> torch.Tensor:
        with torch.no_grad():
            return model(**tok(PROMPT, return_tensors="pt")).logits

    base = plain_logits()
    with pytest.raises(PatchDirectoryError, match="activation 'relu'"):
        Patcher.load(model, tok, tmp_path, PatcherConfig(neuron_activation=None))
    assert torch.equal(plain_logits(), base)  # nothing stays attached
    assert Patcher.load(model, tok, tmp_path).activation == "relu"


def test_merge_folds_relu_neurons_and_refuses_what_the_ffn_cannot_make() -> None:
    patcher = make_patcher("llama", neuron_activation="relu")  # on a SiLU FFN: a scaled gate
    assert patcher.edit(*edit_args(patcher)).success
    before = {t: logits(patcher, t) for t in [PROMPT, *OTHER]}
    merged = patcher.merge()
    for text, expected in before.items():
        enc = patcher.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            assert torch.allclose(merged(**enc).logits, expected, atol=1e-3)
    tanh = make_patcher("llama", neuron_activation="tanh")
    assert tanh.edit(*edit_args(tanh)).success
    with pytest.raises(UnsupportedModelError, match="cannot be folded"):
        tanh.merge()
    assert torch.equal(logits(patcher, PROMPT), before[PROMPT])  # the patch is still attached


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_steps"):
        PatcherConfig(max_steps=0)
    with pytest.raises(ValueError, match="training_loop"):
        PatcherConfig(training_loop="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="neuron_activation"):
        PatcherConfig(neuron_activation="sparkle")
    assert PatcherConfig().resolved_memory_threshold("silu") == -8.0
    assert PatcherConfig().resolved_memory_threshold("gelu") == -3.0
    assert PatcherConfig().resolved_memory_weight("seq-cls") == 5.0
    assert PatcherConfig().resolved_memory_weight("causal-lm") == 10.0
