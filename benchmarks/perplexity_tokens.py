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
import math

import torch
from saved_run import open_run, pre_activations

_SHOWN = 8


def token_losses(patcher, text: str, prompt: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each continuation token's negative log-likelihood with the patch on and off, and the
    position of the first continuation token's prediction."""
    ids = patcher.tokenizer(text, return_tensors="pt")["input_ids"]
    start = len(patcher.tokenizer(prompt)["input_ids"])
    gold = ids[0, start:, None]
    with torch.no_grad():
        on = torch.log_softmax(patcher.model(input_ids=ids).logits[0].float(), -1)
        with patcher.disabled():
            off = torch.log_softmax(patcher.model(input_ids=ids).logits[0].float(), -1)
    nll = [-lp[start - 1 : -1].gather(1, gold)[:, 0] for lp in (on, off)]
    return nll[0], nll[1], start - 1


def main() -> None:
    saved = open_run(__doc__.split("\n\n")[0])
    patcher = saved.patcher
    general = json.loads((saved.folder / "base.json").read_text("utf-8"))["general"]
    target_of = {r["edit_id"]: r["target"] for r in saved.final["records"] if r.get("edit_id")}
    state = patcher.neurons
    rows, total_on, total_off, count = [], 0.0, 0.0, 0
    for text, prompt in zip(general["texts"], general["prompts"], strict=True):
        on, off, first = token_losses(patcher, text, prompt)
        if on.numel() == 0:
            continue
        total_on, total_off, count = (
            total_on + float(on.sum()),
            total_off + float(off.sum()),
            count + on.numel(),
        )
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
    print(f"{count} tokens; perplexity {math.exp(total_off / count):.4f} -> "
          f"{math.exp(total_on / count):.4f}; log-loss {rise:+.2f} nats in all")  # fmt: skip
    rows.sort(key=lambda r: -abs(r[0]))
    for delta, context, token, j, value in rows[:_SHOWN]:
        norm = float(state.values[j].float().norm())
        print(f"{delta:+.3f} nats ({delta / rise:.0%} of the change) ...{context!r} -> {token!r}: "
              f"neuron {j} (edit target {target_of.get(state.owners[j], '?')!r}, value norm "
              f"{norm:.1f}), pre {value:+.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
