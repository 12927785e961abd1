"""Median seconds per edit of another checkout's tpatcher, for side-by-side comparisons.

    PYTHONPATH=OTHER/src python benchmarks/edit_speed_checkout.py OTHER/benchmarks 10
    PYTHONPATH=src python benchmarks/edit_speed_checkout.py benchmarks 10

Runs the first N zsRE mistakes of ``edit_speed.py``'s stream with the default settings and
one torch thread, using the tpatcher found first on ``PYTHONPATH`` and that checkout's own
``edit_speed.py``; run two at once to compare commits under the same load.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(sys.argv[1]).resolve()))
    import edit_speed

    from tpatcher import Patcher, PatcherConfig, load_model

    model, tok = load_model("smollm2-135m")
    edits, memory = edit_speed.zsre_stream(Path(__file__).resolve().parents[2] / "shared/data")
    patcher = Patcher(model, tok, PatcherConfig(), memory_texts=memory)
    _ = patcher.memory
    rows = edit_speed.time_edits(patcher, edits, int(sys.argv[2]))
    summary = {
        "tpatcher": str(Path(sys.modules["tpatcher"].__file__).parent),
        "median_s": statistics.median(r["seconds"] for r in rows),
        "median_steps": statistics.median(r["steps"] for r in rows),
        "fixed": sum(r["success"] for r in rows),
        "edits": len(rows),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
