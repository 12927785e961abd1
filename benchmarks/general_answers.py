"""How many of the 200 general questions a saved bench run's patch answers differently.

    python benchmarks/general_answers.py bench-out/gemma-t500-questions --edits 500 \
        --model gemma3-270m

For a finished ``tpatcher bench`` run whose ``base.json`` predates the general questions on
models without a chat template: it asks them as the bench now does (chat turns, or the zsRE
template ``Question: ...\\nAnswer:`` on a model without a chat template) with the patch off
and on, and prints the share unchanged and every answer whose
first sentence changed (judged as the bench judges ``general_same``).
"""

from __future__ import annotations

from saved_run import open_run

from tpatcher.encoding import has_chat_template
from tpatcher.evaluation.data import ZSRE_FORMAT
from tpatcher.evaluation.metrics import Scorer
from tpatcher.evaluation.protocol import general_prompts, general_questions, same_answer

TOKENS = 48  # the bench's answer_tokens


def main() -> None:
    questions = {"type": int, "default": 200, "help": "the run's --general-questions"}
    saved = open_run(__doc__.split("\n\n")[0], options={"--general-questions": questions})
    patcher = saved.patcher
    tok = patcher.tokenizer
    scorer = Scorer(patcher.model, tok)
    chat = has_chat_template(tok)
    questions = general_questions()[: saved.args.general_questions]
    prompts = general_prompts(
        tok, {"questions": questions, "template": None if chat else ZSRE_FORMAT}
    )
    with patcher.disabled():
        before = scorer.answers(prompts, TOKENS)
    after = scorer.answers(prompts, TOKENS)
    same = [same_answer(a, b) for a, b in zip(after, before, strict=True)]
    for question, b, a, kept in zip(questions, before, after, same, strict=True):
        if not kept:
            print(f"--- {question!r}\n  patch off: {b[:100]!r}\n  patch on:  {a[:100]!r}")
    form = "chat turns" if chat else "the zsRE template"
    print(f"general answers unchanged: {sum(same) / len(same):.3f} of {len(same)} ({form})")


if __name__ == "__main__":
    main()
