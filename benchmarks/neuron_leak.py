"""How much a saved patch's neurons emit on text they were not trained to fire on.

    python benchmarks/neuron_leak.py bench-out/zsre/tpatcher/state --base bench-out/zsre/base.json
    python benchmarks/neuron_leak.py bench-out/gemma-joint/tpatcher/state-30 \
        --base bench-out/gemma-joint/base.json --model gemma3-270m

For three sets of text (the benchmark's general text from ``base.json``, zsRE locality
questions, held-out zsRE questions) it takes every token's last-FFN input and reports how the
patch neurons' gate pre-activations fall (above zero: the neuron fires; between beta and zero:
a SiLU/GELU neuron still emits its negative tail) and the norm of what the whole patch adds to
the FFN output there. A neuron that never fires can still shift the model through that tail.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tpatcher import Patcher, load_model
from tpatcher.evaluation.data import load_task

ROOT = Path(__file__).resolve().parents[1]


def leak_report(patcher: Patcher, texts: list[str]) -> dict[str, float]:
    """Pre-activation shares and the median norm of the patch's output per token."""
    state = patcher.neurons
    q = patcher.ffn_inputs(texts).float()
    pre = q @ state.keys.float().T
    if state.biases is not None:
        pre = pre + state.biases.float()
    delta = patcher.patch_output(q).float()
    ffn = patcher._site.ffn(q.to(patcher._site.dtype)).float()  # the FFN's own output
    beta = patcher.beta
    return {
        "tokens": q.shape[0],
        "tokens_firing": int((pre > 0).any(dim=1).sum()),
        "tokens_patch_over_tenth_of_ffn": int((delta.norm(dim=1) > 0.1 * ffn.norm(dim=1)).sum()),
        "median_ffn_output_norm": float(ffn.norm(dim=1).median()),
        "max_value_norm": float(state.values.float().norm(dim=1).max()),
        "share_firing": float((pre > 0).float().mean()),
        "share_tail": float(((pre > beta) & (pre <= 0)).float().mean()),
        "median_pre_activation": float(pre.median()),
        "median_patch_output_norm": float(delta.norm(dim=1).median()),
        "median_ffn_input_norm": float(q.norm(dim=1).median()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", help="a patch directory saved by Patcher.save")
    parser.add_argument("--base", required=True, help="the run's base.json (its general text)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--count", type=int, default=60, help="questions per zsRE set")
    parser.add_argument("--model", default="smollm2-135m", help="the patch's base model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    patcher = Patcher.load(model, tok, args.state, memory_texts=["unused"])
    base = json.loads(Path(args.base).read_text("utf-8"))
    data = load_task("zsre", args.data, 500, heldout=100)
    sets = {
        "general text": base["general"]["texts"],
        "zsRE locality questions": [it.loc_prompt for it in data.stream[: args.count]],
        "held-out zsRE questions": [it.prompt for it in data.test_heldout[: args.count]],
    }
    print(
        f"{patcher.num_neurons} neurons from {len(patcher.edits)} edits; "
        f"activation {patcher.activation}, beta {patcher.beta}"
    )
    for name, texts in sets.items():
        print(name, json.dumps({k: round(v, 4) for k, v in leak_report(patcher, texts).items()}))


if __name__ == "__main__":
    main()
