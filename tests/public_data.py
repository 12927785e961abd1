"""The benchmark data directory for tests: the shared public files where they are, otherwise
a small made-up set written in the same public formats, so the data tests run on any clone.

``TPATCHER_DATA`` points at a data directory; a directory that does not exist (for example
``TPATCHER_DATA=none``) selects the made-up set.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

_SYLLABLES = ["ka", "lo", "vi", "ren", "tor", "mi", "sa", "bel", "dun", "qua", "zo", "fer"]
_RELATIONS = [  # (question, paraphrase, CounterFact prompt) about a subject
    ("Which country is {s} from?", "What is the home country of {s}?", "{s} is a citizen of"),
    ("What language does {s} speak?", "Which language is spoken by {s}?", "{s} speaks"),
    ("In which city was {s} born?", "Where was {s} born?", "{s} was born in"),
    ("Which company employs {s}?", "Who is the employer of {s}?", "{s} works for"),
]
_NQ = [  # unrelated questions and answers, as zsRE's "loc" field gives them
    ("who wrote the play hamlet", "William Shakespeare"),
    ("what is the largest planet in the solar system", "Jupiter"),
    ("how many legs does a spider have", "eight"),
    ("what is the chemical symbol for gold", "Au"),
    ("who painted the mona lisa", "Leonardo da Vinci"),
    ("what is the boiling point of water in celsius", "100"),
]

# answers of several tokens, so a model predicts some of their later tokens teacher-forced
# (held-out scores are ratios to the unedited model's and need a non-zero base)
_ANSWERS = [
    "New York City",
    "Los Angeles",
    "Rio de Janeiro",
    "Buenos Aires",
    "San Francisco",
    "Kuala Lumpur",
    "Saint Petersburg",
    "Hong Kong",
    "United States of America",
    "United Kingdom",
    "New Zealand",
    "South Africa",
    "Microsoft Corporation",
    "General Electric",
    "Johns Hopkins University",
    "Massachusetts Institute of Technology",
]


def _two_answers(rng: random.Random) -> tuple[str, str]:
    """A true answer and a different counterfactual one."""
    first, second = rng.sample(_ANSWERS, 2)
    return first, second


def _name(rng: random.Random, words: int = 2) -> str:
    return " ".join(
        "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title()
        for _ in range(words)
    )


def _zsre(rng: random.Random, n: int) -> list[dict]:
    records = []
    for _ in range(n):
        question, paraphrase, _ = rng.choice(_RELATIONS)
        subject = _name(rng)
        answer, alt = _two_answers(rng)
        loc, loc_ans = rng.choice(_NQ)
        records.append(
            {
                "subject": subject,
                "src": question.format(s=subject),
                "answers": [answer],
                "pred": _name(rng, 1),
                "alt": alt,
                "rephrase": paraphrase.format(s=subject),
                "loc": f"nq question: {loc}",
                "loc_ans": loc_ans,
                "cond": "",
            }
        )
    return records


def _counterfact(rng: random.Random, n: int, first_id: int) -> list[dict]:
    records = []
    for i in range(n):
        _, _, prompt = rng.choice(_RELATIONS)
        subject, neighbour = _name(rng), _name(rng)
        truth, new = _two_answers(rng)
        records.append(
            {
                "case_id": first_id + i,
                "prompt": prompt.format(s=subject),
                "subject": subject,
                "ground_truth": truth,
                "target_new": new,
                "rephrase_prompt": f"As everyone knows, {prompt.format(s=subject)}",
                "locality_prompt": prompt.format(s=neighbour),
                "locality_ground_truth": rng.choice(_ANSWERS),
            }
        )
    return records


def _fever(rng: random.Random, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        label = rng.choice(["SUPPORTS", "REFUTES"])
        claim = f"{_name(rng)} was born in {_name(rng, 1)} ."
        rows.append({"id": str(i), "claim": claim, "evidence": "", "gold_label": label})
    return rows


def write_made_up(folder: Path) -> Path:
    """Write a made-up data set in the public formats (zsRE: 800 records; CounterFact: 1,000
    edit and 1,000 train records; FEVER-symmetric v0.2: 50 dev and 50 test claims)."""
    rng = random.Random(0)
    files = {
        "zsre/zsre_mend_train_800.json": _zsre(rng, 800),
        "counterfact/counterfact-edit.json": _counterfact(rng, 1000, 0),
        "counterfact/counterfact-train.json": _counterfact(rng, 1000, 10_000),
    }
    files["counterfact/counterfact-edit-1k.json"] = files["counterfact/counterfact-edit.json"]
    for name, records in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(records), "utf-8")
    for split in ("dev", "test"):
        fever = folder / "fever-symmetric" / f"symmetric_v0.2_fever_symmetric_{split}.jsonl"
        fever.parent.mkdir(parents=True, exist_ok=True)
        fever.write_text("".join(json.dumps(r) + "\n" for r in _fever(rng, 50)), "utf-8")
    return folder


def data_dir(scratch: Path) -> Path:
    """The shared data where it is (or ``TPATCHER_DATA``), otherwise the made-up set written
    under ``scratch``."""
    chosen = Path(os.environ.get("TPATCHER_DATA", SHARED))
    return chosen if chosen.is_dir() else write_made_up(scratch)
