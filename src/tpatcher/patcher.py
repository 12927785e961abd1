"""The Patcher: fix a model's mistakes one at a time by adding neurons to its last FFN.

A thin facade: the last FFN and its replay live in :mod:`tpatcher.ffn_site`, the injected
neurons in :mod:`tpatcher.layer`, one edit's training in :mod:`tpatcher.editing`, the memory
bank in :mod:`tpatcher.memory`, patch directories in :mod:`tpatcher.persistence` and merging
in :mod:`tpatcher.merging`.
"""

from __future__ import annotations

import copy
import threading
import time
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import persistence
from .config import PatcherConfig
from .editing import EditRecord, EditResult, Progress, is_right, train_edit_neurons
from .encoding import Example, encode_edit, encode_prompt
from .errors import InvalidEditError, PatchDirectoryError, TPatcherError, UnknownEditError
from .ffn_site import FFNSite, eval_mode
from .layer import NeuronState, PatchLayer
from .memory import MemoryBank, build_memory_bank

__all__ = ["EditRecord", "EditResult", "Patcher", "PatcherCheckpoint"]

#: The patch layer hooked into each model, so a second Patcher on it is refused.
_ATTACHED: weakref.WeakKeyDictionary[torch.nn.Module, weakref.ref[PatchLayer]] = (
    weakref.WeakKeyDictionary()
)


@dataclass(frozen=True)
class PatcherCheckpoint:
    """An editor's published state in memory (see :meth:`Patcher.checkpoint`)."""

    state: NeuronState
    records: tuple[EditRecord, ...]
    edits_attempted: int


class Patcher:
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
        self.activation = self.config.resolved_neuron_activation(self._site.ffn_activation)
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
        self._records: dict[str, EditRecord] = {}
        self._pending: dict[str, tuple[NeuronState, EditRecord]] = {}
        self._directories: dict[Path, persistence.PatchDirectory] = {}
        self._lock = threading.RLock()
        self._counter = 0
        self.beta = self.config.resolved_memory_threshold(self.activation)
        self.memory_weight = self.config.resolved_memory_weight(self.task)

    # -- what is here --------------------------------------------------------------------
    @property
    def edits(self) -> list[EditRecord]:
        """Published edits, oldest first."""
        return list(self._records.values())

    @property
    def edit_ids(self) -> list[str]:
        return list(self._records)

    def get_edit(self, edit_id: str) -> EditRecord | None:
        return self._records.get(edit_id)

    @property
    def pending_edits(self) -> list[str]:
        """Edits trained with ``publish=False`` and not yet published or discarded."""
        return list(self._pending)

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
                for record in [*self._records.values(), *(r for _, r in self._pending.values())]:
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

    def is_mistake(self, prompt: str, target: str | int) -> bool:
        """Whether the patched model gets this wrong (teacher-forced greedy, or the label)."""
        return not is_right(self._site, self.encode(prompt, target))

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
            out = self._site.run(dict(self.tokenizer(text, return_tensors="pt")))
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
    ) -> EditResult:
        """Fix the model's output for ``prompt``: ``target`` text, or ``label`` for a classifier.

        Adds at most ``max_neurons_per_edit`` neurons (one for a classifier), trains them and
        checks the fix with a real forward pass that only this thread sees. An input the model
        already gets right is left alone (``already_correct``); an edit that cannot be fixed
        leaves no neurons behind. With ``publish=False`` a fixed edit stays private (to this
        thread and to later edits of this Patcher) until :meth:`publish` or :meth:`discard`:
        the service writes it durably in between.
        """
        if self.task == "seq-cls":
            target = label if label is not None else target
        elif label is not None:
            raise InvalidEditError("label= is for classifiers; pass the target text")
        with self._lock:
            if edit_id is not None:
                if edit_id in self._records or edit_id in self._pending:
                    raise InvalidEditError(f"edit id {edit_id!r} is already used")
                if not persistence.valid_edit_id(edit_id):
                    raise InvalidEditError(f"edit id {edit_id!r} is not valid")
            start = time.perf_counter()
            example = self.encode(prompt, target)
            staged = self._staged_state()
            with self._layer.private(staged):
                memory = self.memory.vectors()
                trained = train_edit_neurons(
                    self._site,
                    self._layer,
                    self.config,
                    example,
                    memory,
                    seed=self.config.seed + self._counter,
                    beta=self.beta,
                    memory_weight=self.memory_weight,
                    progress=progress,
                )
                if trained.neurons is None:
                    return EditResult(
                        None,
                        True,
                        0,
                        time.perf_counter() - start,
                        0,
                        already_correct=True,
                        message="the model already gets this right",
                    )
                self._counter += 1
                outcome = trained.outcome
                assert outcome is not None
                if not outcome.fixed:
                    return EditResult(
                        None,
                        False,
                        outcome.steps,
                        time.perf_counter() - start,
                        0,
                        outcome.losses,
                        message=f"not fixed within {self.config.max_steps} steps; no neurons kept",
                    )
                new_id = edit_id or uuid.uuid4().hex[:12]
                frozen = trained.neurons.frozen(new_id, self._layer.dtype, self._layer.device)
                with self._layer.private(staged.concat(frozen)):
                    verified = is_right(self._site, example)  # the real model must agree
            if not verified:
                return EditResult(
                    None,
                    False,
                    outcome.steps,
                    time.perf_counter() - start,
                    0,
                    outcome.losses,
                    message="trained, but the full model still gets it wrong; no neurons kept",
                )
            record = EditRecord(
                edit_id=new_id,
                prompt=prompt,
                target=None if self.task == "seq-cls" else str(target),
                label=int(example.targets[0]) if self.task == "seq-cls" else None,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                neurons=frozen.size,
                memory=trained.memory,
                steps=outcome.steps,
                seconds=time.perf_counter() - start,
            )
            self._pending[new_id] = (frozen, record)
            if self.config.add_edits_to_memory:
                self.memory.add_edit(new_id, record.memory)
            if publish:
                self.publish(new_id)
            return EditResult(
                new_id,
                True,
                outcome.steps,
                record.seconds,
                frozen.size,
                outcome.losses,
                published=publish,
            )

    def _staged_state(self) -> NeuronState:
        """Published neurons followed by every pending edit's."""
        state = self._layer.state
        for neurons, _ in self._pending.values():
            state = state.concat(neurons)
        return state

    def publish(self, *edit_ids: str) -> None:
        """Make pending edits visible to every thread, all at once (one state swap)."""
        with self._lock:
            missing = [i for i in edit_ids if i not in self._pending]
            if missing:
                raise UnknownEditError(f"no pending edit with id {missing[0]!r}")
            state = self._layer.state
            for edit_id in edit_ids:
                state = state.concat(self._pending[edit_id][0])
            self._layer.state = state
            for edit_id in edit_ids:
                self._records[edit_id] = self._pending.pop(edit_id)[1]

    def discard(self, *edit_ids: str) -> None:
        """Drop pending edits: nobody but their own thread ever saw them."""
        with self._lock:
            for edit_id in edit_ids:
                if self._pending.pop(edit_id, None) is None:
                    raise UnknownEditError(f"no pending edit with id {edit_id!r}")
                if self._memory is not None:
                    self._memory.remove_edit(edit_id)

    def rollback(self, edit_id: str) -> None:
        """Remove exactly the neurons (and memory vectors) of one published edit."""
        with self._lock:
            if edit_id not in self._records:
                raise UnknownEditError(f"no edit with id {edit_id!r}")
            self._layer.state = self._layer.state.without({edit_id})
            del self._records[edit_id]
            if self._memory is not None:
                self._memory.remove_edit(edit_id)

    # -- switching the patch -------------------------------------------------------------
    def disable(self) -> None:
        """Answer with the base model until :meth:`enable`; edits are kept."""
        self._layer.enabled = False

    def enable(self) -> None:
        self._layer.enabled = True

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """``with patcher.disabled(): ...`` runs the unpatched model (for every thread)."""
        previous = self._layer.enabled
        self._layer.enabled = False
        try:
            yield
        finally:
            self._layer.enabled = previous

    disable_adapter = disabled  # the peft spelling

    def close(self) -> None:
        """Remove the hooks: the model answers as the base model again."""
        self._layer.remove()

    # -- checkpoints and patch directories -----------------------------------------------
    def checkpoint(self) -> PatcherCheckpoint:
        """The published edits and the edit counter, to :meth:`restore` later."""
        with self._lock:
            return PatcherCheckpoint(
                self._layer.state, tuple(self._records.values()), self._counter
            )

    def restore(self, checkpoint: PatcherCheckpoint) -> None:
        """Return to a :meth:`checkpoint`: later edits are gone, pending ones discarded."""
        with self._lock:
            self.discard(*self._pending)
            self._layer.state = checkpoint.state
            self._records = {r.edit_id: r for r in checkpoint.records}
            self._counter = checkpoint.edits_attempted
            if self._memory is not None:
                self._memory.keep_edits(set(self._records))
                for record in self._records.values():
                    self._memory.add_edit(record.edit_id, record.memory)

    def manifest(self, *, include: Sequence[str] = ()) -> dict[str, Any]:
        """The patch directory's manifest: published edits, plus pending ones in ``include``."""
        entries = [r.to_manifest() for r in self._records.values()]
        entries += [self._pending[i][1].to_manifest() for i in include]
        return {
            "base_model": self.base_model_name,
            "fingerprint": self.fingerprint,
            "adapter": self.adapter.name,
            "patched_module": self.block_path,
            "config": self.config.to_dict(),
            "activation": self.activation,  # of the neurons, as resolved; checked on load
            "edits_attempted": self._counter,  # seeds the next edit's neurons (seed + count)
            "edits": entries,
        }

    def _edit_tensors(self, edit_id: str) -> dict[str, torch.Tensor]:
        if edit_id in self._pending:
            state, record = self._pending[edit_id]
        else:
            state, record = self._layer.state.owned_by(edit_id), self._records[edit_id]
        return persistence.edit_tensors(state, record.memory)

    def patch_directory(self, directory: str | Path) -> persistence.PatchDirectory:
        """The writer of ``directory`` (one per path, so it remembers file checksums)."""
        path = Path(directory).expanduser().resolve()
        if path not in self._directories:
            self._directories[path] = persistence.PatchDirectory(path)
        return self._directories[path]

    def save(self, directory: str | Path) -> Path:
        """Write the patch (edit tensors and manifest) atomically; returns the directory."""
        with self._lock:
            target = self.patch_directory(directory)
            target.save(self.manifest(), {i: self._edit_tensors(i) for i in self._records})
        return Path(directory)

    save_pretrained = save  # the transformers/peft spelling

    def save_edit(self, directory: str | Path, edit_id: str) -> str:
        """Append one edit (published, or pending: written before it is published) to a
        saved patch directory, durably; returns its file's SHA-256."""
        with self._lock:
            include = [edit_id] if edit_id in self._pending else []
            if not include and edit_id not in self._records:
                raise UnknownEditError(f"no edit with id {edit_id!r}")
            target = self.patch_directory(directory)
            return target.append(
                self.manifest(include=include), edit_id, self._edit_tensors(edit_id)
            )

    def remove_saved_edit(self, directory: str | Path, edit_id: str) -> None:
        """Remove one edit from a saved patch directory durably (not from the model)."""
        with self._lock:
            manifest = self.manifest()
            manifest["edits"] = [e for e in manifest["edits"] if e["id"] != edit_id]
            self.patch_directory(directory).remove(manifest, edit_id)

    @classmethod
    def load(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        directory: str | Path,
        config: PatcherConfig | None = None,
        **kwargs: Any,
    ) -> Patcher:
        """A Patcher with the edits saved in ``directory``; refuses another model's patch."""
        manifest = persistence.PatchDirectory(directory).read()
        patcher = cls(model, tokenizer, config or PatcherConfig.from_manifest(manifest), **kwargs)
        try:
            patcher.load_edits(directory)
        except BaseException:
            patcher.close()
            raise
        return patcher

    from_pretrained = load  # the transformers/peft spelling

    def load_edits(self, directory: str | Path) -> None:
        """Verify every edit saved in ``directory``, then switch them all in at once (all or
        nothing); the edit counter continues from the saved one."""
        with self._lock:
            source = self.patch_directory(directory)
            manifest = source.read()
            self._check_compatible(manifest, directory)
            state, records = self._layer.state, []
            for entry in manifest["edits"]:
                edit_id = str(entry["id"])
                if edit_id in self._records or edit_id in self._pending:
                    raise PatchDirectoryError(f"edit {edit_id} is already loaded")
                tensors = source.read_edit(entry)
                state = state.concat(
                    persistence.state_from_tensors(edit_id, tensors, self._layer, directory)
                )
                records.append(_record_from(entry, tensors, self._layer.hidden_size))
            self._layer.state = state
            self._counter = max(self._counter, int(manifest.get("edits_attempted", len(records))))
            for record in records:
                self._records[record.edit_id] = record
                if self._memory is not None and self.config.add_edits_to_memory:
                    self._memory.add_edit(record.edit_id, record.memory)

    def _check_compatible(self, manifest: dict[str, Any], directory: str | Path) -> None:
        if manifest.get("fingerprint") != self.fingerprint:
            raise PatchDirectoryError(
                f"{directory} was made for base model {manifest.get('base_model')!r} "
                f"(fingerprint {str(manifest.get('fingerprint'))[:12]}), not for this model "
                f"{self.base_model_name!r} (fingerprint {self.fingerprint[:12]})"
            )
        saved = manifest.get("activation") or PatcherConfig.from_manifest(
            manifest
        ).resolved_neuron_activation(self.ffn_activation)
        if manifest["edits"] and saved != self.activation:
            raise PatchDirectoryError(
                f"{directory} holds neurons with activation {saved!r}, but this patcher's "
                f"neurons use {self.activation!r}; load it with the config it was saved with "
                "(Patcher.load without config) or set neuron_activation accordingly"
            )

    # -- merging -------------------------------------------------------------------------
    def merge(self) -> PreTrainedModel:
        """A plain copy of the model with the neurons folded into a wider last FFN
        (see :func:`tpatcher.merging.merge_into` for how each neuron form is folded)."""
        from .merging import merge_into

        self._layer.remove()
        try:
            merged = copy.deepcopy(self.model)
        finally:
            self._layer.attach()
        if not self._layer.enabled or not self._layer.state.size:
            return merged
        site = FFNSite(merged, self.adapter, self.block_path)
        return merge_into(merged, site, self._layer.state, self.activation)

    merge_and_unload = merge  # the peft spelling


def _record_from(entry: dict[str, Any], tensors: dict[str, torch.Tensor], d: int) -> EditRecord:
    return EditRecord(
        edit_id=str(entry["id"]),
        prompt=str(entry.get("prompt", "")),
        target=entry.get("target"),
        label=entry.get("label"),
        created=str(entry.get("created", "")),
        neurons=int(tensors["keys"].shape[0]),
        memory=tensors.get("memory", torch.zeros(0, d)),
        steps=int(entry.get("steps", 0)),
        seconds=float(entry.get("seconds", 0.0)),
    )


def _model_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", ""))
