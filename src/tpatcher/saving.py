"""Saving a Patcher's edits to a patch directory and loading them back.

A mixin of :class:`tpatcher.Patcher`: whole saves, incremental appends (of published or
pending edits) and removals, all through the one writer
:class:`tpatcher.persistence.PatchDirectory`; loading verifies every file and refuses another
base model's patch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import persistence
from .config import PatcherConfig
from .editing import EditRecord
from .errors import PatchDirectoryError, UnknownEditError
from .layer import NeuronState, PatchLayer

if TYPE_CHECKING:
    from .adapters import ArchitectureAdapter
    from .ffn_site import FFNSite
    from .memory import MemoryBank
    from .patcher import Patcher


class PatchSavingMixin:
    """Patch-directory methods of :class:`~tpatcher.Patcher`."""

    # provided by Patcher
    base_model_name: str
    adapter: ArchitectureAdapter
    config: PatcherConfig
    activation: str
    _layer: PatchLayer
    _site: FFNSite
    _lock: threading.RLock
    _records: dict[str, EditRecord]
    _pending: dict[str, tuple[NeuronState, EditRecord]]
    _directories: dict[Path, persistence.PatchDirectory]
    _memory: MemoryBank | None
    _counter: int
    fingerprint: str
    block_path: str
    ffn_activation: str

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

    def save_edit(self, directory: str | Path, *edit_ids: str) -> dict[str, str]:
        """Append edits (published, or pending: written before they are published) to a
        saved patch directory, durably and together (one manifest write lists them all);
        returns each edit file's SHA-256."""
        with self._lock:
            unknown = [i for i in edit_ids if i not in self._pending and i not in self._records]
            if unknown:
                raise UnknownEditError(f"no edit with id {unknown[0]!r}")
            include = [i for i in edit_ids if i in self._pending]
            tensors = {i: self._edit_tensors(i) for i in edit_ids}
            return self.patch_directory(directory).append(self.manifest(include=include), tensors)

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
        ).resolved_neuron_activation(self.ffn_activation, self._site.normed_output)
        if manifest["edits"] and saved != self.activation:
            raise PatchDirectoryError(
                f"{directory} holds neurons with activation {saved!r}, but this patcher's "
                f"neurons use {self.activation!r}; load it with the config it was saved with "
                "(Patcher.load without config) or set neuron_activation accordingly"
            )


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
        also=tuple(str(p) for p in entry.get("also") or ()),
        subject=entry.get("subject"),
        swapped=tuple(str(n) for n in entry.get("swapped") or ()),
    )
