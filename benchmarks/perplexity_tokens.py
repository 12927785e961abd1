"""Which tokens of the general text carry a saved bench run's perplexity change, and why.

    python benchmarks/perplexity_tokens.py bench-out/gemma-t100 --edits 100 --model gemma3-270m

For a finished ``tpatcher bench`` zsRE run it scores the general text of the run's
``base.json`` (the unedited model's own continuations, as the perplexity metric does) with
the patch on and off, token by token, and prints the perplexity both ways and the tokens
whose log-loss moved most, each with the strongest committed neuron there: its
pre-activation, its edit's target and the norm of its value vector. A perplexity rise that
sits on a few tokens is a few neurons firing where they should not; one spread thinly over
every token is the patch's tail.
"""

from __future__ import annotations

import json

from saved_run import open_run, pre_activations

from tpatcher.evaluation.metrics import Scorer, perplexity

_SHOWN = 8


def main() -> None:
    saved = open_run(__doc__.split("\n\n")[0])
    patcher = saved.patcher
    general = json.loads((saved.folder / "base.json").read_text("utf-8"))["general"]
    target_of = {r["edit_id"]: r["target"] for r in saved.final["records"] if r.get("edit_id")}
    state, scorer = patcher.neurons, Scorer(patcher.model, patcher.tokenizer)
    rows, total_on, total_off, count = [], 0.0, 0.0, 0
    for text, prompt in zip(general["texts"], general["prompts"], strict=True):
        on = scorer.continuation_nll(text, prompt)
        with patcher.disabled():
            off = scorer.continuation_nll(text, prompt)
        first = len(patcher.tokenizer(prompt)["input_ids"]) - 1  # predicts the first token
        if on.numel() == 0:
            continue
        total_on, total_off = total_on + float(on.sum()), total_off + float(off.sum())
        count += on.numel()
        pre = pre_activations(patcher, text)
        ids = patcher.tokenizer(text)["input_ids"]
        for i, delta in enumerate((on - off).tolist()):
            pos = first + i
            j = int(pre[pos].argmax())
            context = patcher.tokenizer.decode(ids[max(0, pos - 8) : pos + 1])
            rows.append(
                (delta, context, patcher.tokenizer.decode(ids[pos + 1]), j, float(pre[pos, j]))
            )
    rise = total_on - total_off
    print(f"{count} tokens; perplexity {perplexity(total_off, count):.4f} -> "
          f"{perplexity(total_on, count):.4f}; log-loss {rise:+.2f} nats in all")  # fmt: skip
    rows.sort(key=lambda r: -abs(r[0]))
    rise = rise or float("inf")  # no change at all: every share below is 0%
    for delta, context, token, j, value in rows[:_SHOWN]:
        norm = float(state.values[j].float().norm())
        print(f"{delta:+.3f} nats ({delta / rise:.0%} of the change) ...{context!r} -> {token!r}: "
              f"neuron {j} (edit target {target_of.get(state.owners[j], '?')!r}, value norm "
              f"{norm:.1f}), pre {value:+.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
