"""``distinct_memory``: texts that open alike give one FFN input at every shared position;
the bank, the mining pool and the edits' memories then keep each such vector once."""

from __future__ import annotations

import torch
from test_core import PROMPT
from test_hard_negatives import _texts
from tiny import make_model, make_tokenizer

from tpatcher import Patcher, PatcherConfig
from tpatcher.memory import distinct_rows

#: Memory texts that share their first words, as chat turns share a system turn.
OPENING = "the weather today is"
TEXTS = [f"{OPENING} {text}" for text in _texts(60)]


def _repeats(vectors: torch.Tensor) -> int:
    return vectors.shape[0] - torch.unique(vectors, dim=0).shape[0]


def _patcher(distinct: bool, size: int = 100000, rounds: int = 0) -> Patcher:
    config = PatcherConfig(distinct_memory=distinct, memory_size=size,
                           hard_negative_rounds=rounds, max_steps=400)  # fmt: skip
    return Patcher(make_model("llama"), make_tokenizer("llama"), config, memory_texts=TEXTS)


def test_distinct_rows_keeps_each_row_once_in_first_order() -> None:
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0])
    rows = torch.stack([c, a, c, b, a, c])
    assert torch.equal(distinct_rows(rows), torch.stack([c, a, b]))
    assert distinct_rows(rows[:0]).shape == (0, 2)
    assert torch.equal(distinct_rows(rows[:1]), rows[:1])


def test_the_bank_keeps_the_same_vectors_once() -> None:
    plain, distinct = _patcher(False), _patcher(True)
    every = plain.memory.vectors()
    assert _repeats(every) >= 4 * (len(TEXTS) - 1)  # the shared opening, once per text
    once = distinct.memory.vectors()
    assert _repeats(once) == 0
    assert torch.equal(torch.unique(once, dim=0), torch.unique(every, dim=0))
    assert "distinct_memory" in PatcherConfig().to_dict()


def test_the_pool_holds_new_vectors_only_and_edits_keep_the_memory_distinct() -> None:
    plain, distinct = _patcher(False, size=40, rounds=2), _patcher(True, size=40, rounds=2)
    assert _repeats(plain.memory.pool) > 0
    bank, pool = distinct.memory.vectors(), distinct.memory.pool
    assert len(bank) == 40 and len(pool) > 0 and _repeats(pool) == 0
    assert _repeats(torch.cat([bank, pool])) == 0  # nothing of the bank is mined again
    for target in ("berlin", "france"):
        result = distinct.edit(PROMPT, target)
        assert result.success, result.message
        assert not distinct.is_mistake(PROMPT, target)
    assert len(distinct.edits) == 2
    assert _repeats(distinct.memory.vectors()) == 0
    assert len(distinct.memory.vectors()) < len(bank) + sum(len(e.memory) for e in distinct.edits)


def test_off_by_default_and_in_older_manifests(tmp_path) -> None:
    assert PatcherConfig().distinct_memory is False
    assert PatcherConfig.paper().distinct_memory is False
    fields = {k: v for k, v in PatcherConfig().to_dict().items() if k != "distinct_memory"}
    assert PatcherConfig.from_manifest({"config": fields}).distinct_memory is False
    patcher = _patcher(True)
    assert patcher.edit(PROMPT, "berlin").success
    patcher.save(tmp_path / "patch")
    again = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path / "patch")
    assert again.config.distinct_memory is True
    assert _repeats(again.memory.vectors()) == 0
    assert not again.is_mistake(PROMPT, "berlin")
