"""The answer ends where the target ends.

T-Patcher trains the target's tokens and nothing after them. When the target's last token
can also begin a longer word, the patched model may write the target and go on inside that
word: "Titan" becomes "Titania", "Rome" "Romeo", "Instruktori" "Instruktoriya". Such an
answer names something else, and a free-answer judge rightly calls it wrong (in a chat run
of 100 edits, 2 of the 7 chat questions still answered wrong after their edit and several
paraphrases failed this way; BENCHMARKS.md). Where the model, given the whole target,
would continue its last word, one more position is trained: the token after the target is
the likeliest that starts a new word or ends the answer (a space-led word, punctuation, the
end of the turn), chosen by the model itself, so the answer keeps its own style.
"""

from __future__ import annotations

import string

import torch

from .encoding import Example
from .ffn_site import FFNSite

#: How many of the likeliest next tokens are searched for one that ends the word.
CANDIDATES = 64


def _after(tokenizer, last: int, token: int) -> str:
    """The text ``token`` adds after ``last`` (decoded as a pair, so a tokenizer that marks
    word starts, spaces or "▁", shows the boundary)."""
    alone = tokenizer.decode([last])
    pair = tokenizer.decode([last, token])
    return pair[len(alone) :] if pair.startswith(alone) else " " + pair


def continues_word(tokenizer, last: int, token: int) -> bool:
    """Whether ``token`` right after ``last`` lengthens its word ("Titan" + "ia")."""
    text = _after(tokenizer, last, token)
    return bool(text) and (text[0].isalnum() or text[0] == "_")


def ends_word(tokenizer, last: int, token: int, special: set[int] | None = None) -> bool:
    """Whether ``token`` after ``last`` ends the word: the end of the text or turn (a
    special token, of ``special`` where given), a space or punctuation first."""
    if token in (tokenizer.all_special_ids if special is None else special):
        return True
    text = _after(tokenizer, last, token)
    return not text or text[0].isspace() or text[0] in string.punctuation


def close_word(site: FFNSite, tokenizer, example: Example) -> Example:
    """``example`` with one more supervised position, whose target ends the answer's last
    word, where the model would otherwise continue that word; else ``example`` itself.
    Causal LMs only (seq2seq and classifiers are returned as they are)."""
    if site.task != "causal-lm" or not len(example.targets):
        return example
    last = int(example.targets[-1])
    if not tokenizer.decode([last])[-1:].isalnum():
        return example  # the target ends in punctuation: nothing can glue to it
    ids = torch.cat([example.inputs["input_ids"][0], example.targets[-1:]]).unsqueeze(0)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = site.run(inputs).logits[0, -1].float()
    top = logits.topk(min(CANDIDATES, logits.shape[-1])).indices.tolist()
    if not continues_word(tokenizer, last, top[0]):
        return example  # the model already ends the word
    special = set(tokenizer.all_special_ids)
    closing = next((t for t in top if ends_word(tokenizer, last, t, special)), None)
    if closing is None:
        return example
    position = example.positions[-1:] + 1
    return Example(
        inputs,
        torch.cat([example.positions, position]),
        torch.cat([example.targets, torch.tensor([closing])]),
    )
