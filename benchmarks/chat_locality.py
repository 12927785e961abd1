"""Which unrelated chat answers a saved bench run's patch changes, and where its neurons fire.

    python benchmarks/chat_locality.py bench-out/t100 --edits 100 --memory-records 200

For a finished ``tpatcher bench`` run (its ``base.json``, ``tpatcher/final.json`` and the
patch saved as ``tpatcher/state-N``) it asks every edited item's unrelated question through
the chat template with the patch on and off, and for each first sentence that changed prints
the answers and every (token position, neuron, pre-activation) where a patch neuron fires
(pre-activation above zero) along the patched answer, with the fired neuron's edit target
and whether the position lies in the prompt or in the model's own answer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tpatcher import Patcher
from tpatcher.encoding import render_chat
from tpatcher.evaluation.data import load_task
from tpatcher.evaluation.metrics import Scorer
from tpatcher.evaluation.protocol import same_answer
from tpatcher.models import load_model


def firing(patcher: Patcher, text: str) -> list[tuple[int, int, float]]:
    """(position, neuron, pre-activation) wherever a committed neuron fires on ``text``."""
    state = patcher.neurons
    pre = patcher.ffn_inputs([text]).float() @ state.keys.float().T
    if state.biases is not None:
        pre = pre + state.biases.float()
    return [(int(i), int(j), round(float(pre[i, j]), 2)) for i, j in (pre > 0).nonzero()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="the bench --out folder of a finished tpatcher run")
    ap.add_argument("--edits", type=int, required=True, help="the run's --edits")
    ap.add_argument("--heldout", type=int, default=20, help="the run's --heldout")
    ap.add_argument("--memory-records", type=int, default=200, help="the run's --memory-records")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    run = Path(args.run)
    model, tok = load_model(args.model)
    base = json.loads((run / "base.json").read_text("utf-8"))["real_use"]
    final = json.loads((run / "tpatcher" / "final.json").read_text("utf-8"))
    data = load_task(
        "zsre", args.data, args.edits, heldout=args.heldout, memory_records=args.memory_records
    )
    by_uid = {it.uid: it for it in data.stream}
    target_of = {r["edit_id"]: r["target"] for r in final["records"] if r.get("edit_id")}
    items = [by_uid[r["uid"]] for r in final["records"] if r["edited"]]
    items = [it for it in items if it.uid in base["loc"]]
    state = run / "tpatcher" / f"state-{args.edits}"
    patcher = Patcher.load(model, tok, state, memory_texts=["unused"])  # no edits to train
    owners = patcher.neurons.owners
    scorer = Scorer(model, tok)
    prompts = [render_chat(tok, str(it.loc_question)) for it in items]
    now = scorer.answers(prompts, int(base["tokens"]))
    with patcher.disabled():
        off = scorer.answers(prompts, int(base["tokens"]))
    changed = 0
    for it, prompt, a, b in zip(items, prompts, now, off, strict=True):
        if same_answer(a, base["loc"][it.uid]) and same_answer(b, base["loc"][it.uid]):
            continue
        changed += 1
        length = len(patcher.ffn_inputs([prompt]))
        print(f"--- {it.loc_question!r}")
        print(f"  patch off: {b[:110]!r}")
        print(f"  patch on:  {a[:110]!r}")
        for pos, neuron, pre in firing(patcher, prompt + a):
            where = "prompt" if pos < length else f"answer token {pos - length}"
            target = target_of.get(owners[neuron], "?")
            print(f"  fires at {where}: neuron {neuron} (edit target {target!r}), pre {pre}")
    print(f"{changed} of {len(items)} unrelated chat answers changed their first sentence")


if __name__ == "__main__":
    main()
