"""Which locality prompts a saved bench run's patch changes, which neurons do it, and whether
the patch at its training strength would have left them alone.

    python benchmarks/locality.py bench-out/cf1000 --task counterfact --edits 1000 \\
        --memory-records 200

For a finished ``tpatcher bench`` run (its ``base.json``, ``tpatcher/final.json`` and the
patch saved as ``tpatcher/state-N``) it scores every edited item's locality prompt
teacher-forced, as ``loc_tf`` does, with the patch as committed and with every value vector
scaled by ``edit_headroom`` (the strength the neurons were trained at; with the paper's
headroom of 1 the two agree). For each changed prompt it takes the neuron that fires most
at the first changed answer position and reports its pre-activation there against its
pre-activation on its own edit, and whether that edit is the item's own (CounterFact's
neighbourhood prompts share the edit's relation and often its wording). Loc misses from
neurons that fire far below their edit strength call for a higher firing point; misses at
full strength, on prompts the memory cannot tell apart from the edit, do not.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from statistics import median
from typing import Any

from saved_run import open_run, pre_activations

from tpatcher.evaluation.data import EditItem
from tpatcher.evaluation.metrics import Forced, Scorer, agreement, mean


def loc_scores(
    scorer: Scorer, items: list[EditItem], base: dict[str, Any]
) -> tuple[list[Forced], list[float]]:
    """Teacher-forced predictions of the items' locality prompts and their ``loc_tf``."""
    forced = scorer.forced([(str(it.loc_prompt), str(it.loc_target)) for it in items])
    scores = [
        agreement(f.predicted, base[it.uid]["pred"]) for f, it in zip(forced, items, strict=True)
    ]
    return forced, scores


def main() -> None:
    saved = open_run(__doc__.split("\n\n")[0])
    patcher, by_uid = saved.patcher, saved.items
    base = json.loads((saved.folder / "base.json").read_text("utf-8"))["loc"]
    records = [r for r in saved.final["records"] if r["edited"] and r.get("edit_id")]
    items = [by_uid[r["uid"]] for r in records if r["uid"] in base]
    scorer = Scorer(patcher.model, patcher.tokenizer)
    state = patcher.neurons
    headroom = float(patcher.config.edit_headroom)
    full, loc_full = loc_scores(scorer, items, base)
    with patcher._layer.private(replace(state, values=state.values * headroom)):
        _, loc_trained = loc_scores(scorer, items, base)
    print(f"locality prompts: {len(items)}; neurons: {state.size}; headroom {headroom}")
    print(f"Loc tf as committed: {mean(loc_full):.4f}; at training strength: ", end="")
    print(f"{mean(loc_trained):.4f}")

    owner_of = {r["edit_id"]: r["uid"] for r in records}
    own_peak: dict[int, float] = {}  # a neuron's largest pre-activation on its own edit
    kinds: Counter[str] = Counter()
    ratios: list[float] = []
    for it, forced, score in zip(items, full, loc_full, strict=True):
        if score == 1.0:
            continue
        pos = next(i for i, p in enumerate(forced.predicted) if p != base[it.uid]["pred"][i])
        ids, _, start = scorer.encode(str(it.loc_prompt), str(it.loc_target))
        text = patcher.tokenizer.decode(ids[: start + pos + 1], skip_special_tokens=True)
        pre = pre_activations(patcher, text)[-1]
        j = int(pre.argmax())
        if float(pre[j]) <= 0:
            kinds["no neuron fires at the first changed position"] += 1
            continue
        edit_id = state.owners[j]
        owner = by_uid[owner_of[edit_id]]
        if j not in own_peak:  # the neuron's peak anywhere in its own edit's text
            own_ids, _, _ = scorer.encode(str(owner.prompt), str(owner.target))
            own_text = patcher.tokenizer.decode(own_ids, skip_special_tokens=True)
            own_peak[j] = float(pre_activations(patcher, own_text)[:, j].max())
        ratio = float(pre[j]) / own_peak[j] if own_peak[j] > 0 else float("inf")
        ratios.append(ratio)
        whose = "own" if owner.uid == it.uid else "another"
        strength = "below" if ratio < headroom else "at or above"
        kinds[f"{whose} edit's neuron, {strength} headroom x edit"] += 1
        if len(ratios) <= 12:
            print(
                f"  {it.loc_prompt!r} -> {it.loc_target!r}: neuron of {owner.prompt!r} -> "
                f"{owner.target!r} at {float(pre[j]):.2f} (x{ratio:.2f} of its edit)"
            )
    print(f"changed prompts: {sum(s < 1.0 for s in loc_full)}")
    for kind, n in kinds.most_common():
        print(f"  {kind}: {n}")
    if ratios:
        print(f"median pre-activation there / on the neuron's edit: {median(ratios):.2f}")


if __name__ == "__main__":
    main()
