"""A finished ``tpatcher bench`` run opened again for diagnosis: its arguments, its final
records, its stream and its saved patch (used by chat_locality.py, generality.py and
locality.py)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tpatcher import Patcher
from tpatcher.evaluation.data import EditItem, load_task
from tpatcher.models import load_model


@dataclass
class SavedRun:
    folder: Path
    patcher: Patcher
    final: dict[str, Any]  # tpatcher/final.json
    items: dict[str, EditItem]  # the stream by uid
    args: argparse.Namespace  # the command line, with the script's own options


def open_run(
    description: str, with_memory: bool = False, options: dict[str, dict] | None = None
) -> SavedRun:
    """Parse the run's command-line arguments and load its model, records, stream and patch;
    ``with_memory``: with the run's memory texts, so ``patcher.memory`` is the run's bank;
    ``options``: the script's own options (flag: ``add_argument`` keywords)."""
    ap = argparse.ArgumentParser(description=description)
    for flag, keywords in (options or {}).items():
        ap.add_argument(flag, **keywords)
    ap.add_argument("run", help="the bench --out folder of a finished tpatcher run")
    ap.add_argument("--edits", type=int, required=True, help="the run's --edits")
    ap.add_argument("--heldout", type=int, default=20, help="the run's --heldout")
    ap.add_argument("--memory-records", type=int, default=200, help="the run's --memory-records")
    ap.add_argument("--task", default="zsre", help="the run's --task")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.run)
    model, tok = load_model(args.model)
    final = json.loads((folder / "tpatcher" / "final.json").read_text("utf-8"))
    data = load_task(
        args.task, args.data, args.edits, heldout=args.heldout, memory_records=args.memory_records
    )
    state = folder / "tpatcher" / f"state-{args.edits}"
    memory = {"memory_texts": data.memory_texts, "memory_source": data.memory_source}
    if not with_memory:
        memory = {"memory_texts": ["unused"]}  # no edits to train
    patcher = Patcher.load(model, tok, state, **memory)
    return SavedRun(folder, patcher, final, {it.uid: it for it in data.stream}, args)


def pre_activations(patcher: Patcher, text: str) -> torch.Tensor:
    """Every committed neuron's pre-activation at every token of ``text`` (tokens, neurons)."""
    state = patcher.neurons
    pre = patcher.ffn_inputs([text]).float() @ state.keys.float().T
    return pre if state.biases is None else pre + state.biases.float()
