"""A true/false claim classifier to edit, standing in for the paper's FEVER fact-checker.

The paper's FEVER editing split (KILT FEVER with Cao et al.'s rephrases) is not available
offline, so the classification task is built from CounterFact: ``prompt + ground_truth`` is a
true claim, ``prompt + target_new`` a false one, and ``rephrase_prompt`` gives each a
paraphrase with the same label. The classifier is MiniLM-L6 fine-tuned on claims from
``counterfact-train.json``; edits and their evaluation use the disjoint edit split, and
FEVER-symmetric measures how much it knows about claims it never saw the style of.

Trained models are cached under ``<cache>/models/minilm-l6-claims-<hash>/`` (the cache is the
argument, else ``$TPATCHER_CACHE``, else ``~/.cache/tpatcher``), written to a temporary
sibling folder and renamed into place so a reader never sees half a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..ffn_site import eval_mode
from ..models import load_model, resolve_cache_dir

logger = logging.getLogger("tpatcher.evaluation.factcheck")

TRAIN_FILE = "counterfact/counterfact-train.json"
EDIT_FILE = "counterfact/counterfact-edit.json"
FEVER_FILES = (
    "fever-symmetric/symmetric_v0.2_fever_symmetric_dev.jsonl",
    "fever-symmetric/symmetric_v0.2_fever_symmetric_test.jsonl",
)
ID2LABEL = {0: "false", 1: "true"}
BASE_MODEL = "minilm-l6"
_VERSION = "claims-v2"  # bump when training changes in a way the settings do not show

__all__ = [
    "ClassifierSettings",
    "build_claims",
    "claim_accuracy",
    "load_claim_classifier",
    "load_counterfact",
    "load_fever_symmetric",
    "train_claim_classifier",
]


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def _claim(prompt: str, obj: str) -> str:
    return f"{prompt.rstrip()} {obj.strip()}"


def build_claims(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Two claims per CounterFact record: the true fact (label 1) and the counterfact (0).

    Each claim is ``{"text", "label", "paraphrase", "case_id", "subject"}``; ``paraphrase``
    is ``rephrase_prompt`` with the same object (``None`` when the record has none), to test
    whether an edit generalises.
    """
    claims: list[dict[str, Any]] = []
    for record in records:
        prompt = record["prompt"]
        rephrase = record.get("rephrase_prompt")
        for obj, label in ((record["ground_truth"], 1), (record["target_new"], 0)):
            claims.append(
                {
                    "text": _claim(prompt, obj),
                    "label": label,
                    "paraphrase": _claim(rephrase, obj) if rephrase else None,
                    "case_id": record.get("case_id"),
                    "subject": record.get("subject"),
                }
            )
    return claims


def load_counterfact(data_dir: str | Path, file: str = EDIT_FILE) -> list[dict[str, Any]]:
    """CounterFact records from ``<data_dir>/<file>`` (the shared data folder's layout)."""
    path = Path(data_dir) / file
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass the shared data folder as data_dir")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def load_fever_symmetric(
    data_dir: str | Path, files: Sequence[str] = FEVER_FILES
) -> list[dict[str, Any]]:
    """FEVER-symmetric claims as ``{"text", "label"}`` (SUPPORTS 1, REFUTES 0), claim only.

    Defaults to the v0.2 dev and test files; a v0.1 file (``label``) reads the same way as a
    v0.2 one (``gold_label``). Exact duplicates are dropped; other labels are skipped.
    """
    mapping = {"SUPPORTS": 1, "REFUTES": 0}
    seen: set[tuple[str, int]] = set()
    out: list[dict[str, Any]] = []
    for name in files:
        path = Path(data_dir) / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; pass the shared data folder as data_dir")
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                row = json.loads(line)
                label = mapping.get(str(row.get("gold_label") or row.get("label")).upper())
                text = str(row.get("claim", "")).strip()
                if label is None or not text or (text, label) in seen:
                    continue
                seen.add((text, label))
                out.append({"text": text, "label": label})
    return out


def _training_texts(records: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Every claim and its paraphrase: the classifier learns facts, not one phrasing."""
    pairs: list[tuple[str, int]] = []
    for claim in build_claims(records):
        pairs.append((claim["text"], claim["label"]))
        if claim["paraphrase"]:
            pairs.append((claim["paraphrase"], claim["label"]))
    return pairs


# --------------------------------------------------------------------------------------------
# training and the cache
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassifierSettings:
    """How the claim classifier is trained; their hash names the cached folder.

    Attributes:
        n_train: CounterFact training records used (each gives 4 texts: true and false
            claim, each with its paraphrase). 800 records x 1 epoch = 100 steps, about
            4-5 min on 2 busy CPU cores (~2.5 s a step).
        epochs: Passes over those texts.
        lr: AdamW learning rate. Every weight but the embeddings is fine-tuned: the
            embedding table is half the model and its dense update doubles the step time.
        batch_size: Texts per step.
        max_length: Texts are truncated to this many tokens (claims are ~10-20).
        seed: Seeds the record sample, the shuffling and the classification head.
    """

    n_train: int = 800
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 48
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps(dict(asdict(self), version=_VERSION, base=BASE_MODEL), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def classifier_dir(settings: ClassifierSettings, cache_dir: str | Path | None = None) -> Path:
    """Where the classifier trained with ``settings`` is cached."""
    return resolve_cache_dir(cache_dir) / "models" / f"{BASE_MODEL}-claims-{settings.key()}"


def _batches(
    texts: list[tuple[str, int]], size: int, rng: random.Random
) -> Iterable[list[tuple[str, int]]]:
    order = list(range(len(texts)))
    rng.shuffle(order)
    for i in range(0, len(order), size):
        yield [texts[j] for j in order[i : i + size]]


def _set_labels(model: PreTrainedModel) -> None:
    model.config.id2label = dict(ID2LABEL)
    model.config.label2id = {v: k for k, v in ID2LABEL.items()}


def train_claim_classifier(
    data_dir: str | Path,
    *,
    n_train: int = ClassifierSettings.n_train,
    epochs: int = ClassifierSettings.epochs,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    lr: float = ClassifierSettings.lr,
    batch_size: int = ClassifierSettings.batch_size,
    max_length: int = ClassifierSettings.max_length,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Fine-tune MiniLM-L6 on CounterFact training claims and cache it (atomically).

    Always trains (and replaces a cached copy); :func:`load_claim_classifier` reuses one.
    Returns the model in eval mode with ``id2label = {0: "false", 1: "true"}``.
    """
    settings = ClassifierSettings(n_train, epochs, lr, batch_size, max_length, seed)
    start = time.perf_counter()
    records = load_counterfact(data_dir, TRAIN_FILE)
    rng = random.Random(seed)
    if n_train < len(records):
        records = rng.sample(records, n_train)
    texts = _training_texts(records)
    torch.manual_seed(seed)  # the fresh classification head
    model, tokenizer = load_model(BASE_MODEL, task="seq-cls", num_labels=2, cache_dir=cache_dir)
    _set_labels(model)
    model.bert.embeddings.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    total = max(1, epochs * ((len(texts) + batch_size - 1) // batch_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, total // 10)) * (1 - step / total)
    )
    step = 0
    for epoch in range(epochs):
        for batch in _batches(texts, batch_size, rng):
            enc = tokenizer(
                [t for t, _ in batch],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            labels = torch.tensor([label for _, label in batch])
            loss = model(**enc, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 25 == 0:
                logger.info("epoch %d step %d/%d loss %.4f", epoch, step, total, float(loss))
    model.bert.embeddings.requires_grad_(True)
    model.eval()
    seconds = time.perf_counter() - start
    info = dict(asdict(settings), seconds=round(seconds, 1), texts=len(texts), steps=step)
    _save(model, tokenizer, classifier_dir(settings, cache_dir), info)
    logger.info("claim classifier trained in %.0f s on %d texts", seconds, len(texts))
    return model, tokenizer


def _save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    target: Path,
    info: dict[str, Any],
) -> None:
    """Write to a temporary sibling and rename it into place (readers never see half)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        (temp / "tpatcher-training.json").write_text(json.dumps(info, indent=2))
        if target.exists():  # a rerun replaces the old copy; move it aside first
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:6]}"
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(temp, target)
    except OSError:
        if target.is_dir() and (target / "config.json").is_file():
            shutil.rmtree(temp, ignore_errors=True)  # another process won the race
            return
        shutil.rmtree(temp, ignore_errors=True)
        raise


def load_claim_classifier(
    data_dir: str | Path, cache_dir: str | Path | None = None, **settings: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The cached classifier trained with ``settings`` (see :class:`ClassifierSettings`),
    training it first if it is not cached. Returned in eval mode."""
    folder = classifier_dir(ClassifierSettings(**settings), cache_dir)
    if (folder / "config.json").is_file():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            _set_labels(model)
            return model.eval(), tokenizer
        except (OSError, ValueError) as exc:
            logger.warning("cached classifier at %s is unreadable (%s); retraining", folder, exc)
    return train_claim_classifier(data_dir, cache_dir=cache_dir, **settings)


def claim_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[dict[str, Any]],
    *,
    key: str = "text",
    batch_size: int = 64,
) -> float:
    """Accuracy of ``model`` on ``items`` (``{key: text, "label": int}``)."""
    rows = [item for item in items if item.get(key)]
    if not rows:
        return float("nan")
    correct = 0
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            enc = tokenizer(
                [r[key] for r in batch], return_tensors="pt", padding=True, truncation=True
            )
            pred = model(**enc).logits.argmax(-1)
            correct += int((pred == torch.tensor([r["label"] for r in batch])).sum())
    return correct / len(rows)
