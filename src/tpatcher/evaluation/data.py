"""Edit streams, held-out sets and memory texts for zsRE, CounterFact and fact-checking.

The data are read from a directory (``../shared/data`` in this project) and never copied.
Prompt formats are fixed and shared by every method:

* zsRE: ``"Question: {question}\\nAnswer:"`` (the default model is instruction-tuned; a bare
  question makes it chat instead of answering). Locality questions (NQ, ``nq question: ``
  prefix stripped) use the same format.
* CounterFact: the raw ``prompt`` / ``rephrase_prompt`` / ``locality_prompt``.
* factcheck: the claim text (a classifier input).

For the real-use metrics each generation item also keeps its raw question (``question``,
``paraphrase_question``, ``loc_question``): what a user would type, asked through the chat
template or as bare text. zsRE: the ``src``/``rephrase``/NQ questions as written;
CounterFact: its raw prompts, which are already what a user would type.

Everything the evaluation sees (stream, paraphrases, locality prompts, held-out sets) is
disjoint from the memory texts handed to T-Patcher and FT+KL, so the memory bank never
contains what locality is measured on.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ZSRE_FORMAT = "Question: {q}\nAnswer:"
BENCH_TASKS = ("zsre", "counterfact", "factcheck")
MODES = ("mistakes", "counterfactual")
DEFAULT_MODE = {"zsre": "mistakes", "counterfact": "counterfactual", "factcheck": "mistakes"}


@dataclass
class EditItem:
    """One request of the stream: prompt -> target, with paraphrase and locality probes."""

    uid: str
    prompt: str
    target: str | int
    paraphrase: str | None = None
    loc_prompt: str | None = None
    loc_target: str | int | None = None
    question: str | None = None
    paraphrase_question: str | None = None
    loc_question: str | None = None
    subject: str | None = None  # what the edit is about, as its prompts name it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TaskData:
    """What one benchmark run needs, split so that no text is used for two purposes."""

    task: str
    mode: str
    kind: str  # "causal-lm" or "seq-cls"
    stream: list[EditItem]
    train_heldout: list[EditItem]
    test_heldout: list[EditItem]
    memory_texts: list[str]
    memory_source: str
    notes: dict[str, Any] = field(default_factory=dict)


def zsre_prompt(question: str) -> str:
    return ZSRE_FORMAT.format(q=question.strip())


def _read_json(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; pass --data pointing at the shared data")
    return json.loads(path.read_text("utf-8"))


def _shuffled(items: list[Any], seed: int) -> list[Any]:
    items = list(items)
    random.Random(seed).shuffle(items)
    return items


def load_task(
    task: str,
    data_dir: str | Path,
    edits: int,
    *,
    seed: int = 0,
    mode: str | None = None,
    heldout: int = 100,
    memory_records: int = 1000,
) -> TaskData:
    """Build the edit stream (``edits`` items), held-out sets and memory texts of a task.

    ``heldout`` caps each of the two held-out sets (TrainR, TestR); ``memory_records`` caps
    the records turned into memory texts.
    """
    if task not in BENCH_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(BENCH_TASKS)}")
    mode = mode or DEFAULT_MODE[task]
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    data_dir = Path(data_dir)
    builder = {"zsre": _zsre, "counterfact": _counterfact, "factcheck": _factcheck}[task]
    return builder(data_dir, edits, seed, mode, heldout, memory_records)


def _zsre(
    data_dir: Path, edits: int, seed: int, mode: str, heldout: int, memory_records: int
) -> TaskData:
    records = _read_json(data_dir / "zsre" / "zsre_mend_train_800.json")
    if edits >= len(records):
        raise ValueError(f"zsRE has {len(records)} records; ask for fewer than that many edits")
    order = _shuffled(list(range(len(records))), seed)
    rest = order[edits:]
    n_held = min(heldout, len(rest) // 3)
    train_ids, test_ids = rest[:n_held], rest[n_held : 2 * n_held]
    memory_ids = rest[2 * n_held :][:memory_records]

    def item(i: int, target: str) -> EditItem:
        r = records[i]
        loc = str(r["loc"]).removeprefix("nq question: ")
        return EditItem(
            uid=f"zsre-{i}",
            prompt=zsre_prompt(r["src"]),
            target=target,
            paraphrase=zsre_prompt(r["rephrase"]),
            loc_prompt=zsre_prompt(loc),
            loc_target=str(r["loc_ans"]),
            question=str(r["src"]).strip(),
            paraphrase_question=str(r["rephrase"]).strip(),
            loc_question=loc.strip(),
            subject=str(r["subject"]) if r.get("subject") else None,
        )

    key = "answers" if mode == "mistakes" else "alt"
    stream = [
        item(i, records[i]["answers"][0] if key == "answers" else records[i]["alt"])
        for i in order[:edits]
    ]
    gold = [item(i, records[i]["answers"][0]) for i in train_ids + test_ids]
    memory = [f"{zsre_prompt(records[i]['src'])} {records[i]['answers'][0]}" for i in memory_ids]
    source = f"{len(memory)} zsRE records outside the stream and held-out sets (question+answer)"
    if len(memory) < memory_records:  # long streams leave few zsRE records: top up
        extra = _read_json(data_dir / "counterfact" / "counterfact-train.json")
        extra = _shuffled(extra, seed)[: max(0, memory_records - len(memory))]
        memory += [f"{r['prompt']} {r['ground_truth']}" for r in extra]
        source += f" + {len(extra)} CounterFact-train facts (prompt + ground truth)"
    return TaskData(
        task="zsre",
        mode=mode,
        kind="causal-lm",
        stream=stream,
        train_heldout=gold[:n_held],
        test_heldout=gold[n_held:],
        memory_texts=memory,
        memory_source=source,
        notes={
            "prompt_format": ZSRE_FORMAT,
            "targets": "gold answers[0]" if mode == "mistakes" else "counterfactual alt",
            "heldout": "TrainR and TestR both use held-out zsRE-train records (gold answers); "
            "no zsRE test split is available in the data directory",
        },
    )


def _counterfact(
    data_dir: Path, edits: int, seed: int, mode: str, heldout: int, memory_records: int
) -> TaskData:
    name = "counterfact-edit-1k.json" if edits <= 1000 else "counterfact-edit.json"
    edit_records = _read_json(data_dir / "counterfact" / name)
    if edits > len(edit_records):
        raise ValueError(f"{name} has {len(edit_records)} records; ask for fewer edits")
    chosen = _shuffled(edit_records, seed)[:edits]
    target_key = "target_new" if mode == "counterfactual" else "ground_truth"
    stream = [
        EditItem(
            uid=f"cf-{r['case_id']}",
            prompt=r["prompt"],
            target=r[target_key],
            paraphrase=r["rephrase_prompt"],
            loc_prompt=r["locality_prompt"],
            loc_target=r["locality_ground_truth"],
            question=r["prompt"],
            paraphrase_question=r["rephrase_prompt"],
            loc_question=r["locality_prompt"],
            subject=r.get("subject") or None,
        )
        for r in chosen
    ]
    used = {r["case_id"] for r in chosen}
    full = _read_json(data_dir / "counterfact" / "counterfact-edit.json")
    test = [r for r in _shuffled(full, seed + 1) if r["case_id"] not in used][:heldout]
    train_records = _shuffled(_read_json(data_dir / "counterfact" / "counterfact-train.json"), seed)
    train = train_records[:heldout]
    memory_part = train_records[heldout : heldout + memory_records]

    def gold(r: dict[str, Any], tag: str) -> EditItem:
        return EditItem(uid=f"{tag}-{r['case_id']}", prompt=r["prompt"], target=r["ground_truth"])

    return TaskData(
        task="counterfact",
        mode=mode,
        kind="causal-lm",
        stream=stream,
        train_heldout=[gold(r, "cftrain") for r in train],
        test_heldout=[gold(r, "cftest") for r in test],
        memory_texts=[f"{r['prompt']} {r['ground_truth']}" for r in memory_part],
        memory_source=f"{len(memory_part)} CounterFact-train facts (prompt + ground truth), "
        "disjoint from the TrainR records",
        notes={
            "prompt_format": "raw CounterFact prompt",
            "targets": target_key,
            "stream_file": name,
            "heldout": "TrainR: CounterFact-train records (ground truth); TestR: records of "
            "counterfact-edit.json outside the stream (ground truth)",
        },
    )


def _factcheck(
    data_dir: Path, edits: int, seed: int, mode: str, heldout: int, memory_records: int
) -> TaskData:
    from .factcheck import build_claims, load_fever_symmetric  # imported only for this task

    edit_claims = _shuffled(
        build_claims(_read_json(data_dir / "counterfact" / "counterfact-edit.json")), seed
    )
    if edits + heldout > len(edit_claims):
        raise ValueError("not enough CounterFact-edit claims for the stream and locality set")
    loc_claims = edit_claims[edits : edits + max(heldout, edits)]
    stream: list[EditItem] = []
    for i, claim in enumerate(edit_claims[:edits]):
        loc = loc_claims[i % len(loc_claims)]
        label = int(claim["label"]) if mode == "mistakes" else 1 - int(claim["label"])
        stream.append(
            EditItem(
                uid=f"claim-{i}",
                prompt=claim["text"],
                target=label,
                paraphrase=claim.get("paraphrase"),
                loc_prompt=loc["text"],
                loc_target=int(loc["label"]),
            )
        )
    train_claims = _shuffled(
        build_claims(_read_json(data_dir / "counterfact" / "counterfact-train.json")), seed
    )
    train = [
        EditItem(uid=f"train-{i}", prompt=c["text"], target=int(c["label"]))
        for i, c in enumerate(train_claims[:heldout])
    ]
    fever = _shuffled(load_fever_symmetric(data_dir), seed)[:heldout]
    test = [
        EditItem(uid=f"fever-{i}", prompt=c["text"], target=int(c["label"]))
        for i, c in enumerate(fever)
    ]
    memory = [c["text"] for c in train_claims[heldout : heldout + memory_records]]
    return TaskData(
        task="factcheck",
        mode=mode,
        kind="seq-cls",
        stream=stream,
        train_heldout=train,
        test_heldout=test,
        memory_texts=memory,
        memory_source=f"{len(memory)} CounterFact-train claims disjoint from the TrainR claims",
        notes={
            "prompt_format": "claim text",
            "targets": "true label" if mode == "mistakes" else "flipped label",
            "heldout": "TrainR: CounterFact-train claims (the classifier's training split); "
            "TestR: FEVER-symmetric claims (factcheck.load_fever_symmetric defaults; real claims, "
            "no paraphrases); locality: "
            "held-out CounterFact-edit claims",
        },
    )
