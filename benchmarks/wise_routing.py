"""Why WISE routes unrelated questions to its side memory on a small model: the activation
scores routing compares with its threshold, for the edited prompts, their paraphrases,
unrelated prompts in the same template and general questions through the chat template.

    python benchmarks/wise_routing.py --edits 30 --probes 20 --threads 1 --data ../shared/data
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from tpatcher.encoding import has_chat_template, render_chat
from tpatcher.evaluation.data import load_task
from tpatcher.evaluation.protocol import general_questions
from tpatcher.evaluation.wise import WiseEditor
from tpatcher.models import load_model


def _summary(scores: list[float], threshold: float) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(scores), 2),
        "min": round(min(scores), 2),
        "max": round(max(scores), 2),
        "routed": round(sum(s >= threshold for s in scores) / len(scores), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--edits", type=int, default=30)
    ap.add_argument("--probes", type=int, default=20, help="unrelated prompts and questions")
    ap.add_argument("--memory-records", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    data = load_task(
        "zsre", args.data, args.edits, heldout=args.probes, memory_records=args.memory_records
    )
    editor = WiseEditor(model, tok, task="causal-lm", locality_texts=data.memory_texts)
    edits = [editor.edit(it.prompt, it.target) for it in data.stream]

    def best(text: str) -> float:  # the score of the memory routing would pick first
        return max(editor.route_scores(text)[0])

    threshold = min(editor.route_scores(data.stream[0].prompt)[1])
    probes = {
        "edited prompts": [it.prompt for it in data.stream],
        "paraphrases": [str(it.paraphrase) for it in data.stream if it.paraphrase],
        "unrelated template prompts": [it.prompt for it in data.test_heldout[: args.probes]],
    }
    if has_chat_template(tok):
        questions = general_questions()[: args.probes]
        probes["general questions, chat"] = [render_chat(tok, q) for q in questions]
    report = {
        "model": args.model,
        "edits": len(edits),
        "fixed": sum(e.success for e in edits),
        "edit_scores": [e.details["edit_score"] for e in edits],
        "threshold": round(threshold, 2),
        "settings": editor.settings(),
        "probes": {k: _summary([best(t) for t in v], threshold) for k, v in probes.items()},
    }
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
