"""Regression tests of the code review's defects: visibility of unverified edits, one Patcher
per model, strict settings, the memory bank's cache key and threads, the vocabulary check."""

from __future__ import annotations

import threading

import pytest
import torch
from test_core import PROMPT, edit_args, logits, make_patcher
from tiny import make_model, make_tokenizer

from tpatcher import InvalidEditError, Patcher, PatcherConfig, TPatcherError, UnknownEditError
from tpatcher import memory as memory_module
from tpatcher.layer import NewNeurons
from tpatcher.training import train_edit


def _in_other_thread(fn):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_an_unpublished_edit_is_seen_only_by_its_own_thread(tmp_path) -> None:
    patcher = make_patcher("llama")
    prompt, target = edit_args(patcher)
    base = logits(patcher, prompt)
    result = patcher.edit(prompt, target, publish=False)
    assert result.success and not result.published and patcher.pending_edits == [result.edit_id]
    assert torch.equal(_in_other_thread(lambda: logits(patcher, prompt)), base)
    assert patcher.edit_ids == [] and patcher.num_neurons == 0
    patcher.save_edit(tmp_path, result.edit_id)  # durable before anyone sees it
    patcher.publish(result.edit_id)
    assert not _in_other_thread(lambda: patcher.is_mistake(prompt, target))
    assert patcher.edit_ids == [result.edit_id]
    loaded = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path)
    assert not loaded.is_mistake(prompt, target)


def test_a_discarded_edit_leaves_no_trace() -> None:
    patcher = make_patcher("llama")
    prompt, target = edit_args(patcher)
    base = logits(patcher, prompt)
    result = patcher.edit(prompt, target, publish=False)
    bank_size = len(patcher.memory)
    patcher.discard(result.edit_id)
    assert patcher.pending_edits == [] and len(patcher.memory) < bank_size
    assert torch.equal(logits(patcher, prompt), base)
    with pytest.raises(UnknownEditError):
        patcher.publish(result.edit_id)


def test_a_batch_of_pending_edits_trains_in_order_and_publishes_together(tmp_path) -> None:
    patcher = make_patcher("llama")
    first = patcher.edit(PROMPT, "berlin", publish=False)
    second = patcher.edit("the capital of italy is", "tokyo", publish=False)
    assert first.success and second.success
    digests = patcher.save_edit(tmp_path, first.edit_id, second.edit_id)
    assert set(digests) == {first.edit_id, second.edit_id}
    patcher.publish(first.edit_id, second.edit_id)
    assert not patcher.is_mistake(PROMPT, "berlin")
    assert not patcher.is_mistake("the capital of italy is", "tokyo")
    loaded = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path)
    assert loaded.edit_ids == [first.edit_id, second.edit_id]


def test_a_duplicate_edit_id_is_refused_also_while_pending() -> None:
    patcher = make_patcher("llama")
    assert patcher.edit(PROMPT, "berlin", edit_id="fix-1", publish=False).success
    with pytest.raises(InvalidEditError, match="already used"):
        patcher.edit("the capital of italy is", "tokyo", edit_id="fix-1")
    with pytest.raises(InvalidEditError, match="not valid"):
        patcher.edit("the capital of italy is", "tokyo", edit_id="../x")


def test_a_model_carries_one_patcher(tmp_path) -> None:
    patcher = make_patcher("llama")
    assert patcher.edit(*edit_args(patcher)).success
    patched = logits(patcher, PROMPT)
    patcher.save(tmp_path)
    with pytest.raises(TPatcherError, match="already carries a Patcher"):
        Patcher.load(patcher.model, patcher.tokenizer, tmp_path)
    assert torch.equal(logits(patcher, PROMPT), patched)  # not applied twice
    patcher.close()
    again = Patcher.load(patcher.model, patcher.tokenizer, tmp_path)
    assert torch.equal(logits(again, PROMPT), patched)


def test_checkpoint_and_restore_return_to_the_same_model() -> None:
    patcher = make_patcher("llama")
    assert patcher.edit(PROMPT, "berlin").success
    saved = patcher.checkpoint()
    expected = logits(patcher, "the capital of italy is")
    assert patcher.edit("the capital of italy is", "tokyo").success
    patcher.restore(saved)
    assert len(patcher.edits) == 1 and patcher.edits_attempted == saved.edits_attempted
    assert torch.equal(logits(patcher, "the capital of italy is"), expected)


def test_peft_spellings_are_the_same_methods(tmp_path) -> None:
    patcher = make_patcher("llama")
    assert patcher.edit(*edit_args(patcher)).success
    patcher.save_pretrained(tmp_path)
    with patcher.disable_adapter():
        base = logits(patcher, PROMPT)
    patcher.close()
    loaded = Patcher.from_pretrained(patcher.model, patcher.tokenizer, tmp_path)
    with loaded.disable_adapter():
        assert torch.equal(logits(loaded, PROMPT), base)


def test_unknown_config_fields_are_refused_not_dropped() -> None:
    with pytest.raises(ValueError, match="'max_step'.*did you mean 'max_steps'"):
        PatcherConfig.from_dict({"max_step": 500})
    assert PatcherConfig.from_dict({"max_steps": 500}).max_steps == 500


def test_the_default_bank_depends_on_the_seed_and_its_cache_key_too(tmp_path, monkeypatch):
    monkeypatch.setenv("TPATCHER_CACHE", str(tmp_path))
    banks = {}
    for seed in (0, 1):
        patcher = Patcher(make_model("llama"), make_tokenizer("llama"), PatcherConfig(seed=seed))
        banks[seed] = patcher.memory.vectors()
    assert not torch.equal(banks[0], banks[1])
    assert len(list((tmp_path / "memory").glob("*.safetensors"))) == 2


def test_the_cache_path_expands_the_home_directory(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("TPATCHER_CACHE", "~/tp-cache")
    assert memory_module.memory_cache_dir() == tmp_path / "tp-cache" / "memory"


def test_building_the_default_bank_keeps_the_patch_on_for_other_threads(monkeypatch) -> None:
    patcher = Patcher(make_model("llama"), make_tokenizer("llama"), PatcherConfig())
    patcher._memory = memory_module.MemoryBank(torch.zeros(0, 64), "empty")
    assert patcher.edit(PROMPT, "berlin").success
    patcher._memory = None
    seen: list[bool] = []

    def build(key, fn, cache_dir=None):
        seen.append(_in_other_thread(lambda: patcher.is_mistake(PROMPT, "berlin")))
        seen.append(patcher.is_mistake(PROMPT, "berlin"))  # this thread: the base model
        return fn()

    monkeypatch.setattr(memory_module, "cached_vectors", build)
    assert len(patcher.memory) > 0
    assert seen == [False, True]


def test_fixed_is_decided_on_the_whole_vocabulary_without_early_stop() -> None:
    d, vocab = 8, 64
    u, w = torch.eye(d)[0], torch.eye(d)[1]
    q = (2 * w - u).reshape(1, d)
    head = torch.randn(vocab, d, generator=torch.Generator().manual_seed(0)) * 0.01
    head[1] = 5 * u  # the target, far below the candidates at first
    head[0] = 6 * u  # not a candidate at the refresh; overtakes the target as it rises
    head[2:6] = 2 * w  # the top-4 candidates at the refresh
    target = torch.tensor([1])
    seen: list[bool] = []

    def logits_fn(neurons: NewNeurons, rows):
        out = (q + neurons(q)) @ head.T
        if rows is None:
            return out
        seen.append(bool(out[:, rows.index].argmax(-1).item() == 0))  # target among rows
        return out[:, rows.index]

    neurons = NewNeurons(
        q,
        gated=False,
        has_bias=False,
        activation="relu",
        amplifier_init=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    config = PatcherConfig(max_steps=3, early_stop=False, vocab_candidates=4, lr=1.0)
    outcome = train_edit(
        neurons,
        logits_fn,
        target,
        q,
        torch.zeros(0, d),
        config=config,
        beta=-3,
        memory_weight=1.0,
        vocab_size=vocab,
    )
    with torch.no_grad():
        full = logits_fn(neurons, None)
    assert seen[-1]  # on the candidate tokens the edit looks fixed...
    assert full.argmax(-1).item() == 0  # ...but token 0 wins on the whole vocabulary
    assert outcome.fixed is False


def test_other_wordings_are_trained_jointly_and_saved(tmp_path) -> None:
    patcher = make_patcher("llama")
    other = "the capital city of france is"
    assert patcher.is_mistake(other, "berlin")
    result = patcher.edit(PROMPT, "berlin", also=[other])
    assert result.success, result.message
    assert not patcher.is_mistake(PROMPT, "berlin") and not patcher.is_mistake(other, "berlin")
    patcher.save(tmp_path)
    loaded = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path)
    assert loaded.edits[0].also == (other,)
    assert not loaded.is_mistake(other, "berlin")


def test_a_chat_model_keeps_chat_turns_of_its_memory_texts_too() -> None:
    tokenizer = make_tokenizer("llama")
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %} the"
    texts = ["the weather today is good", "who wrote the famous novel"]
    sizes = {}
    for chat in (False, None):
        config = PatcherConfig(memory_chat_format=chat)
        patcher = Patcher(make_model("llama"), tokenizer, config, memory_texts=texts)
        sizes[chat] = len(patcher.memory)
        assert ("chat turns" in patcher.memory.source) == (chat is None)
        patcher.close()
    assert sizes[None] > sizes[False]
