"""Which edited questions a finished run's patch does not answer in chat, and why.

    python benchmarks/chat_answers.py bench-out/t100-chat --edits 100

For every edited item of a finished zsRE ``tpatcher bench`` run it asks the question and its
paraphrase through the chat template with the saved patch (greedy, as the chat metrics) and
judges the answers with :func:`tpatcher.answers.contains_answer` as it is now (so a run made
with an earlier judge is re-scored). Each miss is sorted: ``glued`` when the answer starts
with the target but goes on inside its last word ("Titania" for "Titan"), ``elsewhere``
when the target is in the answer but not in its first sentence, ``absent`` otherwise.
Prints the counts as JSON, then each miss with the teacher-forced accuracy of the target
after the chat prompt.
"""

from __future__ import annotations

import json

from saved_run import open_run

from tpatcher.answers import contains_answer, normalize_answer
from tpatcher.encoding import render_chat
from tpatcher.evaluation.metrics import Scorer


def kind(answer: str, target: str) -> str:
    if contains_answer(answer, target):
        return "right"
    if answer.lstrip().startswith(target):
        return "glued"
    return "elsewhere" if normalize_answer(target) in normalize_answer(answer) else "absent"


def main() -> None:
    run = open_run(__doc__.splitlines()[0])
    patcher = run.patcher
    scorer = Scorer(patcher.model, patcher.tokenizer)
    items = [run.items[r["uid"]] for r in run.final["records"] if r.get("edited")]
    forms = {
        "rel": [render_chat(patcher.tokenizer, str(it.question)) for it in items],
        "gen": [render_chat(patcher.tokenizer, str(it.paraphrase_question)) for it in items],
    }
    counts, misses = {}, []
    for name, prompts in forms.items():
        answers = scorer.answers(prompts, 48)
        forced = scorer.forced([(p, str(it.target)) for p, it in zip(prompts, items, strict=True)])
        kinds = [kind(a, str(it.target)) for a, it in zip(answers, items, strict=True)]
        counts[name] = {k: kinds.count(k) for k in ("right", "glued", "elsewhere", "absent")}
        counts[name]["share_right"] = round(kinds.count("right") / len(items), 3)
        for it, answer, f, k in zip(items, answers, forced, kinds, strict=True):
            if k != "right":
                misses.append(
                    {
                        "form": name,
                        "kind": k,
                        "target": it.target,
                        "tf": round(f.accuracy, 2),
                        "answer": answer,
                    }
                )
    print(json.dumps({"run": str(run.folder), "items": len(items), **counts}, indent=1))
    for miss in misses:
        print(json.dumps(miss, ensure_ascii=False))


if __name__ == "__main__":
    main()
