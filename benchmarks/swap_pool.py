"""Which stream subjects could have been swapped into an earlier edit's wordings.

    python benchmarks/swap_pool.py --task counterfact --edits 300 --memory-records 200

With ``subject_negatives_in_memory`` a later edit about a name that an earlier edit swapped
in trains without those earlier wordings (they may be its own paraphrases). Known names are
the subjects guessed in the memory texts and the bundled everyday questions, and the earlier
edits' subjects; this lists the stream items whose subject is among them when the item is
reached, the most the rule can touch in a ``tpatcher bench`` run with the same arguments
(known names only: the bundled invented names are in no data set). No model is loaded.
"""

from __future__ import annotations

import argparse
import json

from tpatcher.evaluation.data import load_task
from tpatcher.subject_negatives import known_names


def in_pool(task: str, data: str, edits: int, heldout: int, memory_records: int) -> dict:
    loaded = load_task(task, data, edits, heldout=heldout, memory_records=memory_records)
    pool = {name.lower() for name in known_names(loaded.memory_texts)}
    hits, earlier = [], set()
    for item in loaded.stream:
        subject = (item.subject or "").lower()
        if subject and (subject in pool or subject in earlier):
            hits.append(item.subject)
        earlier.add(subject)
    return {"task": task, "items": len(loaded.stream), "in_pool": len(hits), "subjects": hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="counterfact")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--edits", type=int, default=300)
    parser.add_argument("--heldout", type=int, default=20)
    parser.add_argument("--memory-records", type=int, default=200)
    args = parser.parse_args()
    result = in_pool(args.task, args.data, args.edits, args.heldout, args.memory_records)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
