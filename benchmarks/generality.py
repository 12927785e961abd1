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

from collections import Counter

import torch
from saved_run import open_run, pre_activations

from tpatcher import Patcher
from tpatcher.evaluation.metrics import Scorer


def last_token_pre(patcher: Patcher, prompt: str) -> torch.Tensor:
    """Every committed neuron's pre-activation at the last token of ``prompt``: where a
    causal model's first target token is due."""
    return pre_activations(patcher, prompt)[-1]


def first_neuron(patcher: Patcher, edit_id: str, edit_pre: torch.Tensor) -> int | None:
    """The edit's neuron that fires most where its first target token is due."""
    mine = [j for j, owner in enumerate(patcher.neurons.owners) if owner == edit_id]
    return max(mine, key=lambda j: float(edit_pre[j])) if mine else None


def main() -> None:
    saved = open_run(__doc__.split("\n\n")[0])
    patcher, by_uid = saved.patcher, saved.items
    model, tok = patcher.model, patcher.tokenizer
    edited = [r for r in saved.final["records"] if r["edited"] and r.get("edit_id")]
    headroom = float(patcher.config.edit_headroom)
    scorer = Scorer(model, tok)
    kinds: Counter[str] = Counter()
    ratios: list[float] = []
    for record in edited:
        item = by_uid[record["uid"]]
        edit_pre = last_token_pre(patcher, item.prompt)
        j = first_neuron(patcher, record["edit_id"], edit_pre)
        if j is None or float(edit_pre[j]) <= 0:
            kinds["no first neuron"] += 1
            continue
        para_pre = last_token_pre(patcher, str(item.paraphrase))
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
