"""Hard-negative mining: inputs outside the trained-against bank that a new edit's neurons
fire on are found, trained against and kept with the edit."""

from __future__ import annotations

import pytest
import torch
from test_core import PROMPT
from tiny import WORDS, make_model, make_tokenizer

from tpatcher import Patcher, PatcherConfig
from tpatcher.memory import default_bank


def _texts(n: int) -> list[str]:
    """Varied short sentences over the tiny vocabulary (reproducible)."""
    g = torch.Generator().manual_seed(1)
    words = [w for w in WORDS if w not in ("berlin", "france")]
    return [
        " ".join(words[int(i)] for i in torch.randint(len(words), (6,), generator=g))
        for _ in range(n)
    ]


def _firing(patcher: Patcher, pool: torch.Tensor) -> int:
    """Pool inputs on which a neuron of the (one) edit is above beta or within the margin
    of its own edit input."""
    keys = patcher._layer.state.keys.float()
    return int((pool @ keys.T > patcher.beta).any(dim=1).sum())


def _patcher(rounds: int) -> Patcher:
    config = PatcherConfig(memory_size=40, hard_negative_rounds=rounds, seed=0, max_steps=400)
    return Patcher(make_model("llama"), make_tokenizer("llama"), config, memory_texts=_texts(120))


def test_the_pool_holds_what_the_bank_left_out_and_only_when_mining() -> None:
    assert len(_patcher(0).memory.pool) == 0
    mining = _patcher(2)
    bank, pool = mining.memory.vectors(), mining.memory.pool
    assert len(bank) == 40 and len(pool) > 100
    every = mining.ffn_inputs(_texts(120))
    assert len(bank) + len(pool) == len(every)  # the bank's sample and the rest


def test_mining_silences_the_neurons_on_the_pool_and_keeps_the_found_inputs() -> None:
    plain, mining = _patcher(0), _patcher(3)
    pool = mining.memory.pool
    results = {}
    for name, patcher in (("plain", plain), ("mining", mining)):
        results[name] = patcher.edit(PROMPT, "berlin")
        assert results[name].success, results[name].message
        assert not patcher.is_mistake(PROMPT, "berlin")
    assert _firing(plain, pool) > 0  # the bank alone leaves violators in the pool
    assert results["mining"].losses["mined"] > 0
    assert _firing(mining, pool) < _firing(plain, pool)
    own = len(plain.edits[0].memory)
    assert len(mining.edits[0].memory) == own + int(results["mining"].losses["mined"])


def test_mining_is_off_by_default_and_settings_are_checked() -> None:
    assert PatcherConfig().hard_negative_rounds == 0
    with pytest.raises(ValueError, match="hard_negative_rounds"):
        PatcherConfig(hard_negative_rounds=-1)


def test_mine_default_bank_puts_the_generic_bank_in_the_pool_not_the_memory() -> None:
    """``mine_default_bank``: the default bank joins the mining pool (its violators alone
    will join the memory), not the bank trained against at every step."""
    config = PatcherConfig(memory_size=40, hard_negative_rounds=1, mine_default_bank=True)
    texts = _texts(120)
    patcher = Patcher(make_model("llama"), make_tokenizer("llama"), config, memory_texts=texts)
    generic = default_bank(patcher._site, patcher.tokenizer, 40, 0, patcher._layer)
    bank, pool = patcher.memory.vectors(), patcher.memory.pool
    assert len(bank) == 40
    assert len(pool) == len(patcher.ffn_inputs(texts)) - 40 + len(generic)
    assert (
        torch.cdist(generic.float(), pool, compute_mode="donot_use_mm_for_euclid_dist")
        .min(dim=1)
        .values.max()
        < 1e-5
    )
    both = PatcherConfig(**{**config.to_dict(), "include_default_memory": True})
    trained = Patcher(make_model("llama"), make_tokenizer("llama"), both, memory_texts=texts)
    assert len(trained.memory.pool) == len(patcher.ffn_inputs(texts)) - 40  # not twice
