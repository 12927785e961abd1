"""How often :func:`tpatcher.guess_subject` finds a record's subject in its question.

    python benchmarks/subject_guess.py --data ../shared/data [--counterfact 10000]

For every zsRE question (``src``) and CounterFact prompt, the guess is compared with the
record's ``subject``: the same text, an overlap (one contains the other: a part of the name,
or the name with a suffix such as "(1863)"), other text, or nothing. Prints the shares as
JSON, with a few misses of each kind. Takes seconds; no model is loaded.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from tpatcher import guess_subject


def judge(guess: str | None, subject: str) -> str:
    if guess == subject:
        return "exact"
    if guess is None:
        return "none"
    return "overlap" if guess in subject or subject in guess else "other"


def score(pairs: list[tuple[str, str]], examples: int) -> dict:
    counts: Counter[str] = Counter()
    misses: dict[str, list[list[str | None]]] = {"overlap": [], "other": [], "none": []}
    for text, subject in pairs:
        guess = guess_subject(text)
        kind = judge(guess, subject)
        counts[kind] += 1
        if kind != "exact" and len(misses[kind]) < examples:
            misses[kind].append([text, subject, guess])
    shares = {k: round(counts[k] / len(pairs), 4) for k in ("exact", "overlap", "other", "none")}
    return {"records": len(pairs), **shares, "misses": misses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--counterfact", type=int, default=10_000, help="CounterFact records")
    parser.add_argument("--examples", type=int, default=5, help="misses shown per kind")
    args = parser.parse_args()
    zsre = json.loads((args.data / "zsre" / "zsre_mend_train_800.json").read_text("utf-8"))
    counterfact = json.loads(
        (args.data / "counterfact" / "counterfact-edit.json").read_text("utf-8")
    )[: args.counterfact]
    result = {
        "zsre": score([(r["src"], r["subject"]) for r in zsre], args.examples),
        "counterfact": score([(r["prompt"], r["subject"]) for r in counterfact], args.examples),
    }
    print(json.dumps(result, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
