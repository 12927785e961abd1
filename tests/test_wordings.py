"""The answer lead: the model's own answer cut where it is about to state the answer, a
wording trained with the edit so the fix reaches answers that first restate the question."""

from __future__ import annotations

import torch
from test_core import MEMORY_TEXTS
from tiny import make_model, make_tokenizer

from tpatcher import Patcher, PatcherConfig
from tpatcher.answers import first_sentence
from tpatcher.wordings import answer_lead, first_target_logprobs

QUESTION = "what is the capital of france"


def _chat_patcher() -> Patcher:
    tokenizer = make_tokenizer("llama")
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %} the"
    config = PatcherConfig(memory_chat_format=False)
    return Patcher(make_model("llama"), tokenizer, config, memory_texts=MEMORY_TEXTS)


def _alone(patcher: Patcher, text: str) -> float:
    """The first target token's log-probability after ``text``, one sequence at a time."""
    example = patcher.encode(text, "berlin")
    with torch.no_grad():
        logits = patcher.model(**example.inputs).logits[0, int(example.positions[0])]
    return float(logits.float().log_softmax(-1)[int(example.targets[0])])


def test_the_lead_is_the_answer_prefix_where_the_target_is_likeliest() -> None:
    patcher = _chat_patcher()
    prompt = patcher.chat_prompt(QUESTION)
    answer = patcher.generate(prompt, 16)
    words = first_sentence(answer).split()
    assert len(words) > 2
    lead = patcher.answer_lead(QUESTION, "berlin", max_new_tokens=16)
    candidates = [prompt] + [prompt + " ".join(words[:j]) for j in range(1, len(words))]
    scores = [_alone(patcher, c) for c in candidates]
    batched = first_target_logprobs(
        patcher._site, [patcher.encode(c, "berlin") for c in candidates]
    )
    assert len(candidates) > 8  # more than one padded batch
    assert torch.allclose(torch.tensor(batched), torch.tensor(scores), atol=1e-4)
    best = candidates[max(range(len(scores)), key=scores.__getitem__)]
    assert lead == (None if best == prompt else best)
    # the same through the module function with the answer given
    assert answer_lead(patcher._site, prompt, answer, lambda t: patcher.encode(t, "berlin")) == lead


def test_an_edit_trained_with_its_lead_fixes_the_lead_too() -> None:
    patcher = _chat_patcher()
    lead = patcher.answer_lead(QUESTION, "berlin", max_new_tokens=16)
    assert lead is not None and lead.startswith(patcher.chat_prompt(QUESTION))
    prompt = patcher.chat_prompt(QUESTION)
    assert patcher.is_mistake(lead, "berlin")
    result = patcher.edit(prompt, "berlin", also=[lead])
    assert result.success, result.message
    assert not patcher.is_mistake(prompt, "berlin") and not patcher.is_mistake(lead, "berlin")
