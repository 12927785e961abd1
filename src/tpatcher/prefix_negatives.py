"""Target-prefix negatives: the edit's own partial answer inside unrelated text.

A neuron placed where a target's second or later token is due keys on the FFN input after
the target's beginning ("... Answer: John" for "John Brackett", "... in 19" for a year).
Free answers and other questions' answers pass such positions all the time ("directed by
John ...", "invented in 19..."), and the memory bank rarely holds the same partial answer,
so these neurons are what leaks into unrelated answers (BENCHMARKS.md, "Where unrelated
answers change at T = 500"). Training them against the same prefix placed after unrelated
contexts makes their keys depend on the edit's question, not on the prefix alone.

The contexts are cut from the memory texts at a random word (and, on a chat model, put as
the opening of an answer to another memory text's chat turn). Their key/value cache is
computed once; each edit then runs only its prefix tokens after every context, in one
batch, on a copy of it. The last FFN's inputs do not depend on the patch (it sits in that
FFN), so the cache stays valid as edits are added.
"""

from __future__ import annotations

import copy
import inspect
import random
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .capture import record
from .config import PatcherConfig
from .encoding import Example, render_chat, tokenize
from .ffn_site import FFNSite, eval_mode
from .memory import default_prompts, uses_chat_memory

#: Words kept of each memory text, so the contexts' cache stays small whatever the texts are.
_MOST_WORDS = 64


def prefix_contexts(
    texts: Sequence[str], count: int, seed: int, tokenizer: PreTrainedTokenizerBase | None
) -> list[str]:
    """``count`` contexts cut from ``texts`` (their first 64 words) at a random word: raw,
    and (with a chat ``tokenizer``) every second one as the opening of the answer to another
    text's turn."""
    rng = random.Random(seed)
    pool = [t.split()[:_MOST_WORDS] for t in texts if t.strip()]  # long texts: their opening
    contexts: list[str] = []
    for i in range(count if pool else 0):
        words = rng.choice(pool)
        cut = " ".join(words[: rng.randint(1, len(words))])
        if tokenizer is not None and i % 2:
            cut = render_chat(tokenizer, " ".join(rng.choice(pool))) + cut
        contexts.append(cut)
    return contexts


class PrefixNegatives:
    """The contexts' cache, and the FFN inputs of an edit's prefix after each of them."""

    def __init__(self, site: FFNSite, tokenizer: PreTrainedTokenizerBase, contexts: list[str]):
        self.site = site
        self.contexts = contexts
        enc = tokenize(tokenizer, contexts, pad_on="left", padding=True, return_tensors="pt")
        device = site.input_device
        self.mask = enc["attention_mask"].to(device)
        self.lengths = self.mask.sum(-1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad(), eval_mode(site.model):
            out = site.model(
                input_ids=enc["input_ids"].to(device),
                attention_mask=self.mask,
                position_ids=positions,
                use_cache=True,
            )
        self.cache: Any = getattr(out, "cache", None) or out.past_key_values
        params = inspect.signature(site.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def vectors(self, example: Example) -> torch.Tensor:
        """(contexts x later target tokens, d) FFN inputs, float32 on CPU; none for a
        one-token target."""
        first = int(example.positions[0])
        prefix = example.inputs["input_ids"][0, first + 1 :]
        if len(prefix) == 0 or not self.contexts:
            return torch.zeros(0, self.site.hidden_size)
        device = self.site.input_device
        n, k = len(self.contexts), len(prefix)
        ids = prefix.to(device).expand(n, k)
        mask = torch.cat([self.mask, self.mask.new_ones(n, k)], dim=1)
        positions = self.lengths[:, None] + torch.arange(k, device=device)
        cache = {self._cache_arg: copy.deepcopy(self.cache)}  # the contexts' own stays as is
        points = self.site.points(only_q=True)
        with torch.no_grad(), eval_mode(self.site.model), record(points) as store:
            self.site.model(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **cache
            )
        return store["q"].float().cpu().reshape(n * k, -1)


def build_prefix_negatives(
    site: FFNSite,
    tokenizer: PreTrainedTokenizerBase,
    config: PatcherConfig,
    texts: Sequence[str] | None,
) -> PrefixNegatives:
    """``config.prefix_negatives`` contexts from the memory texts (tpatcher's generic prompts
    without them), as chat answers too where the memory bank holds chat turns."""
    chat = tokenizer if uses_chat_memory(config, tokenizer) else None
    source = texts or default_prompts()
    contexts = prefix_contexts(source, config.prefix_negatives, config.seed, chat)
    return PrefixNegatives(site, tokenizer, contexts)
