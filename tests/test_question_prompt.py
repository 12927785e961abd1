"""``memory_question_prompt``: tpatcher's everyday questions join memory in the user's own
prompt (for edits made in a template, and models without a chat template), each prompt's
last token kept whatever the size caps drop, with the unedited model's answers."""

from __future__ import annotations

import pytest
import torch
from test_core import PROMPT
from tiny import MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import Patcher, PatcherConfig
from tpatcher.memory import default_questions, question_prompts

ASK = "question {question} answer"


def _patcher(prompt: str | None, answers: int = 0, size: int = 40) -> Patcher:
    config = PatcherConfig(memory_question_prompt=prompt, memory_chat_answers=answers,
                           memory_size=size)  # fmt: skip
    return Patcher(make_model("llama"), make_tokenizer("llama"), config, memory_texts=MEMORY_TEXTS)


def _nearest(patcher: Patcher, vectors: torch.Tensor) -> torch.Tensor:
    bank = patcher.memory.vectors()
    dist = torch.cdist(vectors.float(), bank, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.min(1).values


def test_every_question_opening_joins_memory(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TPATCHER_CACHE", str(tmp_path))
    asked = question_prompts(ASK)
    assert len(asked) == len(default_questions()) > 40 // 4  # more than the cap keeps
    assert asked[0] == f"question {default_questions()[0]} answer"
    without, with_questions = _patcher(None), _patcher(ASK)
    assert "everyday questions" not in without.memory.source
    assert repr(ASK) in with_questions.memory.source
    openings = torch.stack([with_questions.ffn_inputs([text])[-1] for text in asked])
    assert float(_nearest(with_questions, openings).max()) < 1e-3  # every opening is there
    assert float(_nearest(without, openings).max()) > 1e-2  # and was not before
    # the model's own answers after each question join too (a cached greedy continuation)
    answered = _patcher(ASK, answers=4, size=100000)
    plain = _patcher(ASK, answers=0, size=100000)
    assert len(answered.memory.vectors()) > len(plain.memory.vectors())
    result = answered.edit(PROMPT, "berlin")
    assert result.success and not answered.is_mistake(PROMPT, "berlin")


def test_the_prompt_is_checked_saved_and_off_by_default(tmp_path) -> None:
    assert PatcherConfig().memory_question_prompt is None
    assert PatcherConfig.paper().memory_question_prompt is None
    for bad in ("no placeholder", "{question} {answer}", "{question", "{0} {question}"):
        with pytest.raises(ValueError, match="memory_question_prompt"):
            PatcherConfig(memory_question_prompt=bad)
    fields = PatcherConfig().to_dict()
    old = {"config": {k: v for k, v in fields.items() if k != "memory_question_prompt"}}
    assert PatcherConfig.from_manifest(old).memory_question_prompt is None
    patcher = _patcher(ASK)
    patcher.edit(PROMPT, "berlin")
    patcher.save(tmp_path / "patch")
    again = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path / "patch")
    assert again.config.memory_question_prompt == ASK
    assert not again.is_mistake(PROMPT, "berlin")
