"""The negatives one edit trains against beside the shared bank: its target prefix after
unrelated contexts (``prefix_negatives``) and its wordings about invented subjects
(``subject_negatives``) and about names the model knows (``known_subject_negatives``). They
train that edit; with ``subject_negatives_in_memory`` the subject-swap rows also join the
bank with the edit's own inputs, so later edits stay silent on them too."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .config import PatcherConfig
from .encoding import Example
from .ffn_site import FFNSite
from .prefix_negatives import PrefixNegatives, build_prefix_negatives
from .subject_negatives import known_names, name_vectors, nearest_first, subject_negatives


@dataclass(frozen=True)
class NegativeRows:
    """One edit's negatives (float32 FFN inputs, (n, d) each): its wordings about other
    subjects, and its target prefix after unrelated contexts."""

    subject: torch.Tensor
    prefix: torch.Tensor

    def with_bank(self, bank: torch.Tensor) -> torch.Tensor:
        """What the edit trains against: the bank, then these rows."""
        extra = torch.cat([self.subject, self.prefix]).to(bank.device, bank.dtype)
        return torch.cat([bank, extra]) if len(extra) else bank

    def kept(self, own: torch.Tensor, config: PatcherConfig) -> torch.Tensor:
        """What the edit adds to the bank: its own inputs, and with
        ``subject_negatives_in_memory`` its wordings about other subjects."""
        if not config.subject_negatives_in_memory or not len(self.subject):
            return own
        return torch.cat([own, self.subject.to(own.device, own.dtype)])


class EditNegatives:
    """One Patcher's per-edit negatives; the prefix contexts' cache is built on first use."""

    def __init__(
        self,
        site: FFNSite,
        tokenizer: PreTrainedTokenizerBase,
        config: PatcherConfig,
        memory_texts: Sequence[str] | None,
        earlier_subjects: Callable[[], list[str]] = list,
    ) -> None:
        self.site, self.tokenizer, self.config = site, tokenizer, config
        self.memory_texts = memory_texts
        self.earlier_subjects = earlier_subjects  # asked only where known names are swapped in
        self.prefix: PrefixNegatives | None = None
        self._known: tuple[str, ...] | None = None
        self._pictures: dict[str, torch.Tensor] = {}  # name -> name_vectors row
        self.nearest = config.known_subject_pick == "nearest" and site.task == "causal-lm"

    def known(self, subject: str | None = None) -> list[str]:
        """Real names to swap in: those guessed in the memory texts and everyday questions
        (found once), then the earlier edits' subjects; with ``known_subject_pick="nearest"``
        and a ``subject``, nearest the subject first."""
        if self._known is None:
            self._known = known_names(self.memory_texts or ())
        names = list(dict.fromkeys([*self._known, *self.earlier_subjects()]))
        if subject is None or not self.nearest or not names:
            return names
        new = [n for n in dict.fromkeys([*names, subject]) if n not in self._pictures]
        self._pictures.update(zip(new, name_vectors(self.site, self.tokenizer, new), strict=True))
        pictures = torch.stack([self._pictures[n] for n in names])
        return nearest_first(self._pictures[subject], names, pictures)

    def for_edit(
        self,
        example: Example,
        encode: Callable[[str], Example],
        wordings: list[str],
        subject: str | None,
        seed: int,
    ) -> NegativeRows:
        """The FFN inputs this edit's neurons must stay silent on; ``encode`` tokenises a
        wording with the edit's target."""
        known_count = self.config.known_subject_negatives
        known = self.known(subject) if known_count and subject else []
        swapped = subject_negatives(
            self.site,
            encode,
            wordings,
            subject,
            count=self.config.subject_negatives,
            seed=seed,
            known=known,
            known_count=known_count,
            known_in_order=self.nearest,
        )
        prefix = torch.zeros(0, self.site.hidden_size)
        causal = self.site.task == "causal-lm"
        if self.config.prefix_negatives and causal and len(example.positions) > 1:
            if self.prefix is None:
                self.prefix = build_prefix_negatives(
                    self.site, self.tokenizer, self.config, self.memory_texts
                )
            prefix = self.prefix.vectors(example)
        return NegativeRows(swapped, prefix)
