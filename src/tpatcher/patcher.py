"""The Patcher: fix a model's mistakes one at a time by adding neurons to its last FFN.

A thin facade: the last FFN and its replay live in :mod:`tpatcher.ffn_site`, the injected
neurons in :mod:`tpatcher.layer`, one edit's training in :mod:`tpatcher.editing`, the memory
bank in :mod:`tpatcher.memory`, patch directories in :mod:`tpatcher.persistence` and merging
in :mod:`tpatcher.merging`.
"""

from __future__ import annotations

import threading
import uuid
import weakref
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import persistence
from .answers import contains_answer
from .config import PatcherConfig
from .edit_negatives import EditNegatives, NegativeRows
from .editing import EditRecord, EditResult, Progress, is_right, make_edit
from .encoding import Example, encode_edit, encode_prompt, render_chat, tokenize
from .errors import InvalidEditError, TPatcherError
from .ffn_site import FFNSite, eval_mode
from .layer import NeuronState, PatchLayer
from .ledger import EditLedgerMixin, PatcherCheckpoint
from .memory import MemoryBank, build_memory_bank, ffn_inputs
from .saving import PatchSavingMixin
from .subject_negatives import check_subject
from .switching import PatchSwitchMixin
from .word_end import close_word
from .wordings import answer_lead

__all__ = ["EditRecord", "EditResult", "Patcher", "PatcherCheckpoint"]

#: The patch layer hooked into each model, so a second Patcher on it is refused.
_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[PatchLayer]] = (
    weakref.WeakKeyDictionary()
)


class Patcher(EditLedgerMixin, PatchSavingMixin, PatchSwitchMixin):
    """Transformer-Patcher on a Hugging Face model.

    >>> patcher = Patcher(model, tokenizer)
    >>> result = patcher.edit("The capital of Australia is", "Canberra")
    >>> patcher.save("patches/")

    The model stays an ordinary ``transformers`` model: ``model.generate`` uses the patch.
    Base weights are frozen (``requires_grad`` is switched off) and never modified. A model
    carries at most one Patcher at a time.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PatcherConfig | None = None,
        *,
        memory_texts: Sequence[str] | None = None,
        memory_source: str | None = None,
        base_model_name: str | None = None,
    ) -> None:
        owner = _ATTACHED.get(model)
        if owner is not None and (layer := owner()) is not None and layer.attached:
            raise TPatcherError(
                "this model already carries a Patcher; keep using that one (its load_edits() "
                "adds saved edits) or call its close() before creating another"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or PatcherConfig()
        self._site = FFNSite(model, target_module=self.config.target_module)
        self.adapter = self._site.adapter
        self.task = self.adapter.task
        self.base_model_name = base_model_name or _model_name(model)
        self.activation = self.config.resolved_neuron_activation(
            self._site.ffn_activation, self._site.normed_output
        )
        self._layer = PatchLayer(
            self._site.input_module,
            self._site.output_module,
            activation=self.activation,
            gated=self._site.gated,
            has_bias=self._site.has_bias,
            dtype=self._site.dtype,
            device=self._site.device,
            hidden_size=self._site.hidden_size,
        )
        _ATTACHED[model] = weakref.ref(self._layer)
        model.requires_grad_(False)  # base weights are frozen; only new neurons train
        self._memory_texts = list(memory_texts) if memory_texts is not None else None
        self._memory_source = memory_source
        self._memory: MemoryBank | None = None
        self._negatives = EditNegatives(
            self._site, tokenizer, self.config, self._memory_texts, self._all_records
        )
        self._records: dict[str, EditRecord] = {}
        self._pending: dict[str, tuple[NeuronState, EditRecord]] = {}
        self._directories: dict[Path, persistence.PatchDirectory] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self.beta = self.config.resolved_memory_threshold(self.activation)
        self.memory_weight = self.config.resolved_memory_weight(self.task)

    # -- what is here --------------------------------------------------------------------
    @property
    def num_neurons(self) -> int:
        return self._layer.num_neurons

    @property
    def edits_attempted(self) -> int:
        """Edits that reached training; edit ``i`` seeds its neurons with ``seed + i``."""
        return self._counter

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the unpatched last FFN's weights: identifies the base model."""
        return self._site.fingerprint()

    @property
    def block_path(self) -> str:
        return self._site.block_path

    @property
    def ffn_activation(self) -> str:
        return self._site.ffn_activation

    @property
    def input_device(self) -> torch.device:
        return self._site.input_device

    @property
    def memory(self) -> MemoryBank:
        """The memory bank, built on first use (see :mod:`tpatcher.memory`)."""
        with self._lock:
            if self._memory is None:
                bank = build_memory_bank(
                    self._site,
                    self.tokenizer,
                    self.config,
                    self._layer,
                    self._memory_texts,
                    self._memory_source,
                )
                for record in self._all_records():
                    bank.add_edit(record.edit_id, record.memory)
                self._memory = bank
            return self._memory

    # -- asking --------------------------------------------------------------------------
    def encode(self, prompt: str, target: str | int | None) -> Example:
        """Tokenise an edit, refusing inputs that cannot be trained on."""
        return encode_edit(
            self.tokenizer,
            self.model,
            prompt,
            target,
            task=self.task,
            add_space_before_target=self.config.add_space_before_target,
        )

    def is_mistake(
        self,
        prompt: str,
        target: str | int,
        *,
        judge: Literal["tokens", "answer"] = "tokens",
        max_new_tokens: int = 48,
    ) -> bool:
        """Whether the patched model gets this wrong.

        ``judge="tokens"``: teacher-forced, some target token is not the greedy choice (or
        the label is wrong). ``judge="answer"`` (for chat models): the greedy free answer,
        up to ``max_new_tokens`` or the end of the turn, does not contain the target in its
        first sentence (:func:`tpatcher.answers.contains_answer`), so "The capital of
        Australia is Canberra." is left alone.
        """
        if judge == "answer" and self.task != "seq-cls":
            self.encode(prompt, target)  # the same refusals as an edit
            return not contains_answer(self.generate(prompt, max_new_tokens), str(target))
        if judge not in ("tokens", "answer"):
            raise InvalidEditError(f"judge must be 'tokens' or 'answer', not {judge!r}")
        return not is_right(self._site, self.encode(prompt, target))

    def ffn_inputs(self, texts: Sequence[str]) -> torch.Tensor:
        """The last FFN's inputs at every token of ``texts`` (float32): what the memory bank
        holds, for diagnostics such as ``benchmarks/neuron_leak.py``."""
        return ffn_inputs(self._site, self.tokenizer, texts)

    def patch_output(self, q: torch.Tensor) -> torch.Tensor:
        """What the published neurons add to the FFN output for FFN inputs ``q`` (..., d)."""
        return self._layer.committed_output(q.to(self._layer.dtype))

    def chat_prompt(self, question: str) -> str:
        """``question`` as one user turn of the model's chat template, the answer opened: the
        prompt to edit so that a fix reaches chat users (refused without a template)."""
        return render_chat(self.tokenizer, question)

    def answer_lead(self, question: str, target: str, max_new_tokens: int = 48) -> str | None:
        """The chat prompt of ``question`` and the model's own answer up to where it is
        about to state the answer: a wording for ``edit(also=...)`` that carries the fix
        into answers that first restate the question (:func:`tpatcher.wordings.answer_lead`).
        """
        prompt = self.chat_prompt(question)
        answer = self.generate(prompt, max_new_tokens)
        return answer_lead(self._site, prompt, answer, lambda text: self.encode(text, target))

    def generate(self, prompt: str, max_new_tokens: int = 32, **kwargs: Any) -> str:
        """Greedy (by default) continuation of ``prompt`` by the patched model, as text."""
        enc = encode_prompt(self.tokenizer, self.model, prompt)
        kwargs.setdefault("do_sample", False)
        if self.tokenizer.pad_token_id is None:
            kwargs.setdefault("pad_token_id", self.tokenizer.eos_token_id)
        with torch.no_grad(), eval_mode(self.model):
            out = self.model.generate(
                **{k: v.to(self.input_device) for k, v in enc.items()},
                max_new_tokens=max_new_tokens,
                **kwargs,
            )
        new = out[0] if self.task == "seq2seq" else out[0, enc["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def classify(self, text: str) -> int:
        """The patched classifier's label for ``text``."""
        with torch.no_grad():
            out = self._site.run(dict(tokenize(self.tokenizer, text, return_tensors="pt")))
        return int(out.logits.argmax(-1)[0])

    # -- editing -------------------------------------------------------------------------
    def edit(
        self,
        prompt: str,
        target: str | int | None = None,
        *,
        label: str | int | None = None,
        edit_id: str | None = None,
        progress: Progress | None = None,
        publish: bool = True,
        also: Sequence[str] = (),
        subject: str | None = None,
    ) -> EditResult:
        """Fix the model's output for ``prompt``: ``target`` text, or ``label`` for a classifier.

        Adds at most ``max_neurons_per_edit`` neurons (one for a classifier), trains them and
        checks the fix with a real forward pass that only this thread sees. An input the model
        already gets right is left alone (``already_correct``); an edit that cannot be fixed
        leaves no neurons behind. With ``publish=False`` a fixed edit stays pending: no
        forward pass sees it (except the later edits of this Patcher, which train on top of
        it) until :meth:`publish`; :meth:`discard` drops it. The service writes it durably in
        between. ``also`` gives other wordings of the prompt (a chat turn, the bare question)
        that must give the same target, trained jointly. ``subject`` names what the edit is
        about, as the prompt writes it; with ``subject_negatives`` the same wordings about
        other subjects are trained as negatives, so the fix leaves those questions alone.
        """
        if self.task == "seq-cls":
            target = label if label is not None else target
        elif label is not None:
            raise InvalidEditError("label= is for classifiers; pass the target text")
        with self._lock:
            self._check_new_id(edit_id)
            check_subject(subject, prompt)
            example = self.encode(prompt, target)
            examples = [example, *(self.encode(p, target) for p in also)]
            with self._layer.private(self._staged_state()):
                negatives = self._edit_negatives(example, [prompt, *also], target, subject)
                if self.config.close_target_word:
                    examples = [close_word(self._site, self.tokenizer, e) for e in examples]
                made = make_edit(
                    self._site,
                    self._layer,
                    self.config,
                    examples,
                    negatives.with_bank(self.memory.vectors()),
                    edit_id=edit_id or uuid.uuid4().hex[:12],
                    seed=self.config.seed + self._counter,
                    beta=self.beta,
                    memory_weight=self.memory_weight,
                    progress=progress,
                    pool=self.memory.pool,
                )
            result = made.result
            if result.already_correct:  # nothing was trained
                return result
            self._counter += 1
            if made.neurons is None or made.memory is None or result.edit_id is None:
                return result
            kept, swapped = negatives.kept(made.memory)
            record = EditRecord(
                edit_id=result.edit_id,
                prompt=prompt,
                target=None if self.task == "seq-cls" else str(target),
                label=int(example.targets[0]) if self.task == "seq-cls" else None,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                neurons=made.neurons.size,
                memory=kept,
                steps=result.steps,
                seconds=result.seconds,
                also=tuple(also),
                subject=subject,
                swapped=swapped,
            )
            self._pending[result.edit_id] = (made.neurons, record)
            if self.config.add_edits_to_memory:
                self.memory.add_edit(result.edit_id, record.memory)
            if publish:
                self.publish(result.edit_id)
            result.published = publish
            return result

    def _edit_negatives(
        self, example: Example, wordings: list[str], target: str | int | None, subject: str | None
    ) -> NegativeRows:
        """This edit's own negatives (:mod:`tpatcher.edit_negatives`)."""
        seed = self.config.seed + self._counter
        return self._negatives.for_edit(example, self.encode, wordings, target, subject, seed)

    def _all_records(self) -> list[EditRecord]:
        """The published edits, then the pending ones."""
        return [*self._records.values(), *(r for _, r in self._pending.values())]

    def _check_new_id(self, edit_id: str | None) -> None:
        if edit_id is None:
            return
        if edit_id in self._records or edit_id in self._pending:
            raise InvalidEditError(f"edit id {edit_id!r} is already used")
        if not persistence.valid_edit_id(edit_id):
            raise InvalidEditError(f"edit id {edit_id!r} is not valid")

    # -- merging -------------------------------------------------------------------------
    def merge(self) -> PreTrainedModel:
        """A plain copy of the model with the neurons folded into a wider last FFN
        (see :func:`tpatcher.merging.merge_into` for how each neuron form is folded)."""
        from .merging import merged_copy

        return merged_copy(self.model, self._layer, self.adapter, self.block_path, self.activation)

    merge_and_unload = merge  # the peft spelling


def _model_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", ""))
