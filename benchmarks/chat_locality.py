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

import json

from saved_run import open_run, pre_activations

from tpatcher import Patcher
from tpatcher.encoding import render_chat
from tpatcher.evaluation.metrics import Scorer
from tpatcher.evaluation.protocol import same_answer


def firing(patcher: Patcher, text: str) -> list[tuple[int, int, float]]:
    """(position, neuron, pre-activation) wherever a committed neuron fires on ``text``."""
    pre = pre_activations(patcher, text)
    return [(int(i), int(j), round(float(pre[i, j]), 2)) for i, j in (pre > 0).nonzero()]


def main() -> None:
    saved = open_run(__doc__.split("\n\n")[0])
    patcher, final, by_uid = saved.patcher, saved.final, saved.items
    model, tok = patcher.model, patcher.tokenizer
    base = json.loads((saved.folder / "base.json").read_text("utf-8"))["real_use"]
    target_of = {r["edit_id"]: r["target"] for r in final["records"] if r.get("edit_id")}
    items = [by_uid[r["uid"]] for r in final["records"] if r["edited"]]
    items = [it for it in items if it.uid in base["loc"]]
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
