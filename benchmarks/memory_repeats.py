"""How many rows of a finished run's memory are copies of one vector.

Texts that open alike (a BOS token, ``"Question:"``, a chat template's system turn) give the
same last-FFN input at every shared position. This script rebuilds the run's memory bank and
mining pool (from the run's memory texts and saved settings; cached parts are reused) and
reads every committed edit's saved memory, and reports for each: rows, distinct rows and the
largest number of copies of one row, plus how many edits' mined inputs reached a round's cap
(``memory_top_k``). ``PatcherConfig.distinct_memory`` keeps each such vector once.

    python benchmarks/memory_repeats.py bench-out/gemma-t100-questions --edits 100 \\
        --model gemma3-270m
"""

from __future__ import annotations

import json

import torch
from saved_run import open_run


def repeats(name: str, vectors: torch.Tensor) -> dict[str, int | str]:
    """Rows, distinct rows and the most copies of one row."""
    if not len(vectors):
        return {"part": name, "rows": 0, "distinct": 0, "most_copies": 0}
    _, counts = torch.unique(vectors.float(), dim=0, return_counts=True)
    return {"part": name, "rows": len(vectors), "distinct": len(counts),
            "most_copies": int(counts.max())}  # fmt: skip


def main() -> None:
    run = open_run(__doc__ or "", with_memory=True)
    patcher = run.patcher
    bank = patcher.memory
    edits = [edit.memory for edit in patcher.edits]
    mined = [int(r.get("mined") or 0) for r in run.final.get("records", []) if r.get("edited")]
    cap = patcher.config.memory_top_k
    largest = max(edits, key=len) if edits else bank.base[:0]
    report = {
        "run": str(run.folder),
        "config": {k: v for k, v in patcher.config.to_dict().items() if "memory" in k or
                   k in ("hard_negative_rounds", "mine_default_bank", "negative_pool_size")},
        "parts": [
            repeats("bank", bank.base),
            repeats("pool", bank.pool),
            repeats("edits' saved memories", torch.cat(edits) if edits else bank.base[:0]),
            repeats("bank and edits (what an edit trains against)", bank.vectors()),
        ],
        "largest edit memory": repeats("largest edit", largest),
        "edits mined": len([m for m in mined if m]),
        "mined in all": sum(mined),
        "edits whose mining reached a round's cap": len([m for m in mined if m >= cap]),
    }  # fmt: skip
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
