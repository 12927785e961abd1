"""The negatives one edit trains against beside the shared bank: its target prefix after
unrelated contexts (``prefix_negatives``) and its wordings about invented subjects
(``subject_negatives``) and about names the model knows (``known_subject_negatives``). They
train that edit; with ``subject_negatives_in_memory`` the subject-swap rows also join the
bank with the edit's own inputs, so later edits stay silent on them too, except an edit about
a name swapped in earlier: the earlier wordings about it may be its own paraphrases, so
they leave its training bank (:meth:`EditNegatives.earlier_swaps_about`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .config import PatcherConfig
from .editing import EditRecord, apart_from
from .encoding import Example
from .ffn_site import FFNSite
from .prefix_negatives import PrefixNegatives, build_prefix_negatives
from .subject_negatives import (
    about,
    inputs_at_positions,
    known_names,
    name_vectors,
    nearest_first,
    subject_negatives,
)

#: Tokenises a wording with a target (``Patcher.encode``).
Encode = Callable[[str, "str | int | None"], Example]


@dataclass(frozen=True)
class NegativeRows:
    """One edit's negatives (float32 FFN inputs, (n, d) each): its wordings about other
    subjects (the ``names`` swapped in), its target prefix after unrelated contexts, and the
    bank's rows it must not train against (earlier wordings about its subject). ``shared``:
    the swapped wordings join the bank with the edit (``subject_negatives_in_memory``)."""

    subject: torch.Tensor
    names: tuple[str, ...]
    prefix: torch.Tensor
    leave_out: torch.Tensor
    shared: bool

    def with_bank(self, bank: torch.Tensor) -> torch.Tensor:
        """What the edit trains against: the bank less ``leave_out``, then these rows."""
        bank = apart_from(bank, self.leave_out.to(bank.device, bank.dtype))
        extra = torch.cat([self.subject, self.prefix]).to(bank.device, bank.dtype)
        return torch.cat([bank, extra]) if len(extra) else bank

    def kept(self, own: torch.Tensor) -> tuple[torch.Tensor, tuple[str, ...]]:
        """What the edit adds to the bank (its own inputs, and the swapped wordings where
        they are shared) and the names swapped into what it adds."""
        if not self.shared or not len(self.subject):
            return own, ()
        return torch.cat([own, self.subject.to(own.device, own.dtype)]), self.names


class EditNegatives:
    """One Patcher's per-edit negatives; the prefix contexts' cache is built on first use."""

    def __init__(
        self,
        site: FFNSite,
        tokenizer: PreTrainedTokenizerBase,
        config: PatcherConfig,
        memory_texts: Sequence[str] | None,
        earlier_edits: Callable[[], list[EditRecord]] = list,
    ) -> None:
        self.site, self.tokenizer, self.config = site, tokenizer, config
        self.memory_texts = memory_texts
        self.earlier_edits = earlier_edits  # asked only where subjects are swapped
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
        earlier = [r.subject for r in self.earlier_edits() if r.subject]
        names = list(dict.fromkeys([*self._known, *earlier]))
        if subject is None or not self.nearest or not names:
            return names
        new = [n for n in dict.fromkeys([*names, subject]) if n not in self._pictures]
        self._pictures.update(zip(new, name_vectors(self.site, self.tokenizer, new), strict=True))
        pictures = torch.stack([self._pictures[n] for n in names])
        return nearest_first(self._pictures[subject], names, pictures)

    def for_edit(
        self,
        example: Example,
        encode: Encode,
        wordings: list[str],
        target: str | int | None,
        subject: str | None,
        seed: int,
    ) -> NegativeRows:
        """The FFN inputs this edit's neurons must stay silent on, and those they need not."""
        known_count = self.config.known_subject_negatives
        known = self.known(subject) if known_count and subject else []
        swapped, names = subject_negatives(
            self.site,
            lambda text: encode(text, target),
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
        leave_out = self.earlier_swaps_about(subject, encode)
        shared = self.config.subject_negatives_in_memory
        return NegativeRows(swapped, tuple(names), prefix, leave_out, shared)

    def earlier_swaps_about(self, subject: str | None, encode: Encode) -> torch.Tensor:
        """The rows earlier edits put in the bank with ``subject`` swapped into their
        wordings (``subject_negatives_in_memory``), which an edit about ``subject`` must not
        be trained silent on: "The capital of Spain is", a swap of an earlier edit about
        France, is a paraphrase of a later edit about Spain. Recomputed (one padded pass)
        only for the earlier edits that swapped this very name in."""
        if not subject:
            return torch.zeros(0, self.site.hidden_size)
        examples = [
            encode(text, _target_of(record))
            for record in self.earlier_edits()
            if record.subject and subject.lower() in {n.lower() for n in record.swapped}
            for text in about([record.prompt, *record.also], record.subject, [subject])
        ]
        empty = torch.zeros(0, self.site.hidden_size)
        return inputs_at_positions(self.site, examples) if examples else empty


def _target_of(record: EditRecord) -> str | int | None:
    return record.target if record.target is not None else record.label
