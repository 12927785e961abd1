"""The answer ends where the target ends (``close_target_word``), on tiny models."""

from __future__ import annotations

import pytest
from test_core import edit_args, make_patcher
from tiny import ARCHITECTURES

from tpatcher import PatcherConfig
from tpatcher.word_end import close_word, continues_word, ends_word


def test_off_by_default_and_in_the_papers_form_and_for_older_patches() -> None:
    assert not PatcherConfig().close_target_word
    assert not PatcherConfig.paper().close_target_word
    assert not PatcherConfig.from_manifest({"config": {}}).close_target_word


def test_a_word_tokenizer_ends_every_word_so_nothing_is_added() -> None:
    """Word-level tokens decode apart ("paris berlin"): no token continues a word."""
    patcher = make_patcher("llama", close_target_word=True)
    tok = patcher.tokenizer
    last, other = tok.convert_tokens_to_ids(["berlin", "paris"])
    assert not continues_word(tok, last, other) and ends_word(tok, last, other)
    assert ends_word(tok, last, tok.eos_token_id)
    prompt, target = edit_args(patcher)
    example = patcher.encode(prompt, target)
    assert close_word(patcher._site, tok, example) is example
    assert patcher.edit(prompt, target).success


@pytest.mark.parametrize("kind", [k for k in ARCHITECTURES if k in ("bert", "t5", "bart")])
def test_other_model_kinds_are_left_as_they_are(kind: str) -> None:
    patcher = make_patcher(kind, close_target_word=True)
    example = patcher.encode(*edit_args(patcher))
    assert close_word(patcher._site, patcher.tokenizer, example) is example
