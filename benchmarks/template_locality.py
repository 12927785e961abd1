"""Which unrelated template answers a saved bench run's patch changes, and which neurons do it.

    python benchmarks/template_locality.py bench-out/t500-floor3-first --edits 500

For a finished ``tpatcher bench`` zsRE run it reads every edited item's locality question in
the edit template, teacher-forced with its answer, with the patch on and off. For each
answer token whose greedy choice the patch changed it prints the committed neurons that fire
there (pre-activation above zero), their edit's target, and the neuron's rank among its
edit's neurons (0: placed at the earliest wrong target position, usually the first token).
The summary splits the changes into those at the answer's first token (a neighbouring
question fires a first-position neuron) and those inside the answer (a later-token neuron
keyed on a partial answer such as "19").
"""

from __future__ import annotations

from collections import Counter

import torch
from saved_run import open_run, pre_activations


def main() -> None:
    saved = open_run(__doc__.split("\n\n")[0])
    patcher, final, by_uid = saved.patcher, saved.final, saved.items
    target_of = {r["edit_id"]: r["target"] for r in final["records"] if r.get("edit_id")}
    owners = patcher.neurons.owners
    rank = [owners[: i + 1].count(owner) - 1 for i, owner in enumerate(owners)]
    items = [by_uid[r["uid"]] for r in final["records"] if r["edited"]]
    where: Counter[str] = Counter()
    for it in items:
        example = patcher.encode(str(it.loc_prompt), str(it.loc_target))
        with torch.no_grad():
            on = patcher.model(**example.inputs).logits[0, example.positions].argmax(-1)
            with patcher.disabled():
                off = patcher.model(**example.inputs).logits[0, example.positions].argmax(-1)
        moved = (on != off).nonzero().flatten().tolist()
        if not moved:
            continue
        text = patcher.tokenizer.decode(example.inputs["input_ids"][0])
        pre = pre_activations(patcher, text)
        print(f"--- {it.loc_prompt!r} -> {it.loc_target!r}")
        for k in moved:
            pos = int(example.positions[k])
            fired = [(j, round(float(pre[pos, j]), 2)) for j in (pre[pos] > 0).nonzero().flatten()]
            label = "first token" if k == 0 else f"answer token {k}"
            where[label if k == 0 else "inside the answer"] += 1
            print(f"  {label}: {patcher.tokenizer.decode(int(off[k]))!r} -> "
                  f"{patcher.tokenizer.decode(int(on[k]))!r}")  # fmt: skip
            for j, value in fired:
                print(f"    neuron {j} (edit target {target_of.get(owners[j], '?')!r}, "
                      f"rank {rank[j]}), pre {value}")  # fmt: skip
    print(f"changed answer tokens: {dict(where)}; over {len(items)} edited items")


if __name__ == "__main__":
    main()
