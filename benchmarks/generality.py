"""Why paraphrases of a saved bench run's edits fail: does the edit's neuron not fire on the
paraphrase, fire too weakly, or fire and still not fix it?

    python benchmarks/generality.py bench-out/t100-defaults --edits 100

For a finished ``tpatcher bench`` run on zsRE (its ``tpatcher/final.json`` and the patch
saved as ``tpatcher/state-N``) it scores every edited item's paraphrase teacher-forced with
the patch on, and for the paraphrase's first target token compares the pre-activation of
the edit's own first neuron (the one trained where the edit's first target token is due) on
the paraphrase with its pre-activation on the edit. A failed first token is then counted as

- **silent**: the neuron does not fire on the paraphrase (pre-activation <= 0);
- **weak**: it fires, at less than ``edit_headroom`` times its strength on the edit, below
  what training made sure fixes the token;
- **strong**: it fires at least that strongly and the token is still wrong.

Silent failures call for keys that reach further; weak ones for more headroom; strong ones
for values that carry across contexts.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch

from tpatcher import Patcher
from tpatcher.evaluation.data import load_task
from tpatcher.evaluation.metrics import Scorer
from tpatcher.models import load_model


def pre_activations(patcher: Patcher, prompt: str) -> torch.Tensor:
    """Every committed neuron's pre-activation at the last token of ``prompt``: where a
    causal model's first target token is due."""
    state = patcher.neurons
    q = patcher.ffn_inputs([prompt])[-1].float()
    pre = state.keys.float() @ q
    return pre + state.biases.float() if state.biases is not None else pre


def first_neuron(patcher: Patcher, edit_id: str, edit_pre: torch.Tensor) -> int | None:
    """The edit's neuron that fires most where its first target token is due."""
    mine = [j for j, owner in enumerate(patcher.neurons.owners) if owner == edit_id]
    return max(mine, key=lambda j: float(edit_pre[j])) if mine else None


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
    final = json.loads((run / "tpatcher" / "final.json").read_text("utf-8"))
    data = load_task(
        "zsre", args.data, args.edits, heldout=args.heldout, memory_records=args.memory_records
    )
    by_uid = {it.uid: it for it in data.stream}
    edited = [r for r in final["records"] if r["edited"] and r.get("edit_id")]
    patcher = Patcher.load(model, tok, run / "tpatcher" / f"state-{args.edits}", memory_texts=["x"])
    headroom = float(patcher.config.edit_headroom)
    scorer = Scorer(model, tok)
    kinds: Counter[str] = Counter()
    ratios: list[float] = []
    for record in edited:
        item = by_uid[record["uid"]]
        edit_pre = pre_activations(patcher, item.prompt)
        j = first_neuron(patcher, record["edit_id"], edit_pre)
        if j is None or float(edit_pre[j]) <= 0:
            kinds["no first neuron"] += 1
            continue
        para_pre = pre_activations(patcher, str(item.paraphrase))
        ratio = max(float(para_pre[j]), 0.0) / float(edit_pre[j])
        ratios.append(ratio)
        forced = scorer.forced([(str(item.paraphrase), item.target)])[0]
        if forced.predicted[0] == forced.targets[0]:
            kinds["first token right"] += 1
            continue
        kind = "silent" if ratio == 0 else "weak" if ratio < headroom else "strong"
        kinds[kind] += 1
        print(
            f"{kind:6s} ratio {ratio:.2f} pre {float(para_pre[j]):6.1f} (edit "
            f"{float(edit_pre[j]):5.1f})  {item.paraphrase!r} -> {item.target!r}"
        )
    total = sum(kinds.values())
    print(f"\n{total} edited items, edit_headroom {headroom}:")
    for kind, n in kinds.most_common():
        print(f"  {kind}: {n}")
    if ratios:
        fired = sorted(ratios)
        print(f"  median firing ratio on the paraphrase: {fired[len(fired) // 2]:.2f}")


if __name__ == "__main__":
    main()
