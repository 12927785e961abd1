"""Tests for the claim classifier: the claim builder, the FEVER reader, and train/cache/load.

The builder and reader are pure functions tested on hand-written records in a temporary
folder; the training path runs a tiny job (a few records, one epoch) into a temporary cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tpatcher.evaluation import factcheck
from tpatcher.evaluation.factcheck import (
    ClassifierSettings,
    build_claims,
    claim_accuracy,
    classifier_dir,
    load_claim_classifier,
    load_fever_symmetric,
    train_claim_classifier,
)

RECORD = {
    "case_id": 2,
    "prompt": "Toko Yasuda, the",
    "target_new": "piano",
    "subject": "Toko Yasuda",
    "ground_truth": "guitar",
    "rephrase_prompt": "Toko Yasuda is incredible at",
    "locality_prompt": "John Lennon performs on the",
    "locality_ground_truth": "guitar",
}


def _record(i: int) -> dict:
    return dict(RECORD, case_id=i, subject=f"Person {i}", prompt=f"Person {i} plays the")


def test_build_claims() -> None:
    claims = build_claims([RECORD, dict(RECORD, rephrase_prompt="")])
    assert len(claims) == 4
    true, false = claims[:2]
    assert true == {
        "text": "Toko Yasuda, the guitar",
        "label": 1,
        "paraphrase": "Toko Yasuda is incredible at guitar",
        "case_id": 2,
        "subject": "Toko Yasuda",
    }
    assert false["text"] == "Toko Yasuda, the piano" and false["label"] == 0
    assert false["paraphrase"] == "Toko Yasuda is incredible at piano"
    assert claims[2]["paraphrase"] is None
    assert build_claims([]) == []


def test_load_fever_symmetric(tmp_path: Path) -> None:
    folder = tmp_path / "fever-symmetric"
    folder.mkdir()
    v1 = [
        {"id": "1", "label": "SUPPORTS", "claim": "A is B ."},
        {"id": "2", "label": "REFUTES", "claim": "A is C ."},
        {"id": "3", "label": "NOT ENOUGH INFO", "claim": "A is D ."},
    ]
    v2 = [
        {"id": "1", "gold_label": "SUPPORTS", "label": "SUPPORTS", "claim": "A is B ."},
        {"id": "4", "gold_label": "REFUTES", "label": "REFUTES", "claim": "E is F ."},
    ]
    (folder / "v1.jsonl").write_text("\n".join(json.dumps(r) for r in v1) + "\n\n")
    (folder / "v2.jsonl").write_text("\n".join(json.dumps(r) for r in v2))
    rows = load_fever_symmetric(tmp_path, ["fever-symmetric/v1.jsonl", "fever-symmetric/v2.jsonl"])
    assert rows == [
        {"text": "A is B .", "label": 1},
        {"text": "A is C .", "label": 0},
        {"text": "E is F .", "label": 0},
    ]
    with pytest.raises(FileNotFoundError):
        load_fever_symmetric(tmp_path / "nowhere")


def test_settings_hash_names_the_cache(tmp_path: Path) -> None:
    a = classifier_dir(ClassifierSettings(), tmp_path)
    assert a.parent == tmp_path / "models" and a.name.startswith("minilm-l6-claims-")
    assert a == classifier_dir(ClassifierSettings(), tmp_path)
    assert a != classifier_dir(ClassifierSettings(n_train=10), tmp_path)


def test_train_cache_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    (data / "counterfact").mkdir(parents=True)
    (data / "counterfact" / "counterfact-train.json").write_text(
        json.dumps([_record(i) for i in range(6)])
    )
    cache = tmp_path / "cache"
    settings = dict(n_train=4, epochs=1, batch_size=8)
    model, tok = train_claim_classifier(data, cache_dir=cache, **settings)
    assert model.config.id2label == {0: "false", 1: "true"}
    assert not model.training
    assert all(p.requires_grad for p in model.parameters())
    folder = classifier_dir(ClassifierSettings(**settings), cache)
    assert (folder / "config.json").is_file()
    info = json.loads((folder / "tpatcher-training.json").read_text())
    assert info["texts"] == 16 and info["n_train"] == 4
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left

    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(factcheck, "train_claim_classifier", no_training)
    loaded, loaded_tok = load_claim_classifier(data, cache_dir=cache, **settings)
    assert loaded.config.id2label == {0: "false", 1: "true"}
    enc = tok(["Person 1 plays the guitar"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(model(**enc).logits, loaded(**enc).logits, atol=1e-5)
    items = [{"text": "Person 1 plays the guitar", "label": 1}]
    assert claim_accuracy(loaded, loaded_tok, items) in (0.0, 1.0)
