"""Target-prefix negatives: the edit's partial answer after unrelated contexts, read through
one cached batch, and new neurons trained to stay silent there."""

from __future__ import annotations

import pytest
import torch
from test_core import PROMPT, make_patcher
from tiny import make_tokenizer

from tpatcher import PatcherConfig
from tpatcher.encoding import tokenize
from tpatcher.prefix_negatives import PrefixNegatives, prefix_contexts

TARGET = "berlin the big city"


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma3"])
def test_the_cached_batch_gives_each_contexts_own_ffn_inputs(kind) -> None:
    patcher = make_patcher(kind)
    contexts = ["the weather", "who wrote the famous novel about a whale", "paris is in"]
    negatives = PrefixNegatives(patcher._site, patcher.tokenizer, contexts)
    example = patcher.encode(PROMPT, TARGET)
    prefix = example.inputs["input_ids"][0, int(example.positions[0]) + 1 :].tolist()
    assert len(prefix) >= 2
    for _ in range(2):  # the cache is cropped back after each use
        got = negatives.vectors(example).view(len(contexts), len(prefix), -1)
        for row, context in enumerate(contexts):
            ids = list(tokenize(patcher.tokenizer, context)["input_ids"]) + prefix
            alone = patcher.ffn_inputs([patcher.tokenizer.decode(ids, skip_special_tokens=True)])
            enc = {"input_ids": torch.tensor([ids])}
            expected = patcher._site.ffn_inputs(enc | {"attention_mask": torch.ones(1, len(ids))},
                                                "attention_mask")[-len(prefix):]  # fmt: skip
            assert torch.allclose(got[row], expected, atol=1e-4), (kind, row)
            assert alone.shape[-1] == expected.shape[-1]
    one_token = patcher.encode(PROMPT, "berlin")
    if len(one_token.positions) == 1:
        assert negatives.vectors(one_token).shape[0] == 0


def test_contexts_are_cut_at_a_word_raw_and_as_chat_answers() -> None:
    texts = ["one two three four", "five six seven"]
    raw = prefix_contexts(texts, 6, seed=1, tokenizer=None)
    assert len(raw) == 6 and raw == prefix_contexts(texts, 6, seed=1, tokenizer=None)
    assert all(any(t.startswith(c) for t in texts) and c for c in raw)
    tok = make_tokenizer("llama")
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %} the"
    chat = prefix_contexts(texts, 6, seed=1, tokenizer=tok)
    assert all("</s>" in c for c in chat[1::2]) and all("</s>" not in c for c in chat[::2])
    assert prefix_contexts([], 4, seed=0, tokenizer=None) == []
    long = [" ".join(f"w{i}" for i in range(500))]  # a long text gives its opening only
    assert all(len(c.split()) <= 64 for c in prefix_contexts(long, 20, seed=0, tokenizer=None))


def _highest_pre_activation(patcher, vectors: torch.Tensor) -> float:
    state = patcher.neurons
    pre = vectors.float() @ state.keys.float().T
    return float((pre if state.biases is None else pre + state.biases.float()).max())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_new_neurons_stay_silent_after_the_prefix_in_unrelated_text(kind) -> None:
    patchers = {n: make_patcher(kind, prefix_negatives=n, activation_floor=0.0) for n in (8, 0)}
    for patcher in patchers.values():
        assert patcher.edit(PROMPT, TARGET).success
        assert not patcher.is_mistake(PROMPT, TARGET)
        assert patcher.neurons.size >= 2  # later target tokens got neurons of their own
    on = patchers[8]
    negatives = on._negatives.prefix.vectors(on.encode(PROMPT, TARGET))
    assert negatives.shape[0] == 8 * (on.neurons.size - 1)
    assert _highest_pre_activation(on, negatives) < 0  # silent after the prefix elsewhere
    assert _highest_pre_activation(patchers[0], negatives) > 0  # without them: fires there
    # the negatives train this edit only; the bank keeps the edit's own inputs, as before
    assert len(on.memory) == len(patchers[0].memory)
    with pytest.raises(ValueError, match="prefix_negatives"):
        PatcherConfig(prefix_negatives=-1)


def test_off_by_default_and_in_the_papers_form() -> None:
    assert PatcherConfig().prefix_negatives == 0 and PatcherConfig.paper().prefix_negatives == 0
    patcher = make_patcher("llama")
    patcher.edit(PROMPT, TARGET)
    assert patcher._negatives.prefix is None
