"""Tests for tpatcher.models: the embedded models, local folders, and the conversion cache.

The real SmolLM2 conversion takes ~30 s, so those tests use the default cache (respecting
``$TPATCHER_CACHE``) and later test modules reuse it. Cache mechanics (interrupted or racing
conversions, broken folders) run against a temporary cache with a stand-in converter that
writes a tiny random model, so they take a fraction of a second.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gguf
import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers import models as tok_models
from transformers import (
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from tpatcher import models
from tpatcher.errors import ModelNotFoundError, UnsupportedModelError
from tpatcher.models import EMBEDDED_MODELS, load_model, model_cache_dir, resolve_cache_dir

PROMPT = "The capital of France is"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _save_tiny_llama(folder: Path) -> None:
    """Write a tiny random Llama with a word-level tokenizer: a complete HF folder, offline."""
    words = ["[UNK]", "[PAD]", "<s>", "</s>", "the", "capital", "of", "france", "is", "paris"]
    backend = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(words)}, "[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="<s>",
        eos_token="</s>",
    )
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


class FakeConverter:
    """Stands in for the GGUF conversion: writes a tiny model and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, entry, package_dir: Path, dest: Path) -> None:
        self.calls += 1
        _save_tiny_llama(dest)


@pytest.fixture
def fake_converter(monkeypatch: pytest.MonkeyPatch) -> FakeConverter:
    converter = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", converter)
    return converter


@pytest.fixture(scope="module")
def smollm2():
    """The real SmolLM2 from the default cache (converted there on the first run)."""
    return load_model("smollm2-135m")


def _greedy(model, tokenizer, prompt: str, n: int = 6) -> str:
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def _temps(models_dir: Path) -> list[Path]:
    return sorted(models_dir.glob(".*.tmp-*"))


# --------------------------------------------------------------------------------------------
# real embedded models
# --------------------------------------------------------------------------------------------


def test_smollm2_is_default_and_answers_paris(smollm2) -> None:
    model, tokenizer = smollm2
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.name_or_path == "smollm2-135m"
    assert model.dtype == torch.float32
    assert not model.training
    assert tokenizer.pad_token is not None
    assert _greedy(model, tokenizer, PROMPT).startswith(" Paris")
    assert (model_cache_dir("smollm2-135m") / "model.safetensors").is_file()


def test_smollm2_second_load_comes_from_cache(smollm2, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_gguf(*args, **kwargs):
        raise AssertionError("the GGUF file was read although a cached copy exists")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", no_gguf)
    monkeypatch.setattr(models, "_convert_gguf", no_gguf)
    started = time.perf_counter()
    model, tokenizer = load_model()
    elapsed = time.perf_counter() - started
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.name_or_path == "smollm2-135m"
    assert elapsed < 30, f"cached load took {elapsed:.1f} s"
    reference, _ = smollm2
    for name, param in model.state_dict().items():
        assert torch.equal(param, reference.state_dict()[name]), name


def test_smollm2_with_other_heads_and_dtype(smollm2) -> None:
    model, _ = load_model("smollm2-135m", task="seq-cls", num_labels=3, dtype=torch.bfloat16)
    assert isinstance(model, LlamaForSequenceClassification)
    assert model.config.num_labels == 3
    assert model.config.pad_token_id is not None
    assert model.dtype == torch.bfloat16
    with pytest.raises(UnsupportedModelError, match="seq2seq"):
        load_model("smollm2-135m", task="seq2seq")


def test_minilm_loads_as_two_label_classifier() -> None:
    model, tokenizer = load_model("minilm-l6")
    assert isinstance(model, BertForSequenceClassification)
    assert model.config.num_labels == 2
    assert model.config.name_or_path == "minilm-l6"
    assert not model.training
    enc = tokenizer(["a short sentence", "another one"], padding=True, return_tensors="pt")
    assert enc.input_ids[0, 0] == tokenizer.cls_token_id
    with torch.no_grad():
        assert model(**enc).logits.shape == (2, 2)
    five, _ = load_model("minilm-l6", num_labels=5)
    assert five.config.num_labels == 5


@pytest.mark.slow
def test_gemma3_loads_with_bos_and_generates_sensibly() -> None:
    model, tokenizer = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.name_or_path == "gemma3-270m"
    ids = tokenizer(PROMPT).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    # The quantised 270M base model continues the bare prompt with " the capital of..."; Paris
    # is still among its top guesses, and a one-shot prompt is answered correctly.
    enc = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        top = model(**enc).logits[0, -1].topk(5).indices
    assert " Paris" in [tokenizer.decode(t) for t in top]
    answer = _greedy(model, tokenizer, f"{PROMPT} Paris. The capital of Germany is", n=3)
    assert answer.startswith(" Berlin")


# --------------------------------------------------------------------------------------------
# names and local folders
# --------------------------------------------------------------------------------------------


def test_unknown_name_lists_embedded_models(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        load_model("no-such-model", cache_dir=tmp_path)
    for name in EMBEDDED_MODELS:
        assert name in str(info.value)


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_local_folder_loads_with_inferred_and_chosen_heads(tmp_path: Path) -> None:
    _save_tiny_llama(tmp_path / "tiny")
    model, tokenizer = load_model(str(tmp_path / "tiny"))
    assert isinstance(model, LlamaForCausalLM)
    assert not model.training
    assert tokenizer("the capital").input_ids == [4, 5]
    _greedy(model, tokenizer, "the capital of", n=2)

    classifier, _ = load_model(str(tmp_path / "tiny"), task="seq-cls")
    assert isinstance(classifier, LlamaForSequenceClassification)
    assert classifier.config.num_labels == 2

    # A saved classifier is recognised as one and keeps its label count.
    classifier.save_pretrained(tmp_path / "cls")
    tokenizer.save_pretrained(tmp_path / "cls")
    again, _ = load_model(str(tmp_path / "cls"))
    assert isinstance(again, LlamaForSequenceClassification)
    assert again.config.num_labels == 2


def test_bad_arguments_raise_value_error() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        load_model("minilm-l6", task="translation")
    with pytest.raises(ValueError, match="num_labels"):
        load_model("minilm-l6", task="causal-lm", num_labels=3)


def test_missing_package_names_pip_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ghost = models.EmbeddedModel(
        name="ghost",
        package="tpatcher-ghost-weights",
        module="tpatcher_ghost_weights",
        source="gguf",
        path="ghost.gguf",
        default_task="causal-lm",
        install="pip install tpatcher-ghost-weights",
    )
    monkeypatch.setitem(EMBEDDED_MODELS, "ghost", ghost)
    with pytest.raises(ModelNotFoundError, match="pip install tpatcher-ghost-weights"):
        load_model("ghost", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "ghost").exists()


# --------------------------------------------------------------------------------------------
# cache location and conversion mechanics (temporary cache, stand-in converter)
# --------------------------------------------------------------------------------------------


def test_cache_dir_argument_beats_env_beats_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TPATCHER_CACHE", raising=False)
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "tpatcher"
    monkeypatch.setenv("TPATCHER_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert model_cache_dir("x", tmp_path / "arg") == tmp_path / "arg" / "models" / "x"


def test_conversion_happens_once(fake_converter: FakeConverter, tmp_path: Path) -> None:
    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert model.config.name_or_path == "smollm2-135m"
    load_model("smollm2-135m", cache_dir=tmp_path)
    assert fake_converter.calls == 1
    target = tmp_path / "models" / "smollm2-135m"
    assert (target / models.PROVENANCE_FILE).is_file()
    assert _temps(tmp_path / "models") == []


def test_leftover_temp_folder_does_not_break_next_load(
    fake_converter: FakeConverter, tmp_path: Path
) -> None:
    models_dir = tmp_path / "models"
    # A conversion killed mid-write (say, by SIGKILL) leaves its hidden temp folder behind.
    recent = models_dir / ".smollm2-135m.tmp-99999-deadbeef"
    recent.mkdir(parents=True)
    (recent / "config.json").write_text("{")
    (recent / "model.safetensors").write_bytes(b"half a tensor")
    old = models_dir / ".smollm2-135m.tmp-88888-cafef00d"
    old.mkdir()
    long_ago = time.time() - 2 * models.STALE_TEMP_SECONDS
    os.utime(old, (long_ago, long_ago))

    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert isinstance(model, LlamaForCausalLM)
    assert fake_converter.calls == 1
    assert not old.exists()  # old leftovers are swept...
    assert recent.exists()  # ...recent ones may belong to a conversion still running


def test_interrupted_conversion_leaves_nothing_loadable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def interrupted(entry, package_dir: Path, dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert not (tmp_path / "models" / "smollm2-135m").exists()
    assert _temps(tmp_path / "models") == []

    converter = FakeConverter()
    monkeypatch.setattr(models, "_convert_gguf", converter)
    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert isinstance(model, LlamaForCausalLM)
    assert converter.calls == 1


def test_incomplete_cache_folder_is_rebuilt(fake_converter: FakeConverter, tmp_path: Path) -> None:
    target = tmp_path / "models" / "smollm2-135m"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # no weights, no tokenizer
    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert isinstance(model, LlamaForCausalLM)
    assert fake_converter.calls == 1
    assert (target / "model.safetensors").is_file()
    assert _temps(tmp_path / "models") == []


def test_corrupt_cache_folder_says_to_delete_it(
    fake_converter: FakeConverter, tmp_path: Path
) -> None:
    load_model("smollm2-135m", cache_dir=tmp_path)
    target = tmp_path / "models" / "smollm2-135m"
    (target / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelNotFoundError, match="delete") as info:
        load_model("smollm2-135m", cache_dir=tmp_path)
    assert str(target) in str(info.value)
    assert fake_converter.calls == 1


def test_losing_a_conversion_race_uses_the_winners_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    target = tmp_path / "models" / "smollm2-135m"

    def racing(entry, package_dir: Path, dest: Path) -> None:
        _save_tiny_llama(target)  # another process finishes first...
        _save_tiny_llama(dest)  # ...while this one is still writing

    monkeypatch.setattr(models, "_convert_gguf", racing)
    model, _ = load_model("smollm2-135m", cache_dir=tmp_path)
    assert isinstance(model, LlamaForCausalLM)
    assert not (target / models.PROVENANCE_FILE).exists()  # the winner's copy, not ours
    assert _temps(tmp_path / "models") == []
