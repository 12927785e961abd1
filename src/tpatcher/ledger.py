"""Which edits a Patcher holds: published, pending (trained and verified, not yet visible
to other threads), rolled back, checkpointed.

A mixin of :class:`tpatcher.Patcher`. Published neurons form one immutable state that is
swapped whole, so every forward pass sees an edit completely or not at all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .editing import EditRecord
from .errors import UnknownEditError
from .layer import NeuronState, PatchLayer
from .memory import MemoryBank


@dataclass(frozen=True)
class PatcherCheckpoint:
    """An editor's published state in memory (see :meth:`Patcher.checkpoint`)."""

    state: NeuronState
    records: tuple[EditRecord, ...]
    edits_attempted: int


class EditLedgerMixin:
    """Edit bookkeeping of :class:`~tpatcher.Patcher`."""

    # provided by Patcher
    _layer: PatchLayer
    _lock: threading.RLock
    _records: dict[str, EditRecord]
    _pending: dict[str, tuple[NeuronState, EditRecord]]
    _memory: MemoryBank | None
    _counter: int

    @property
    def neurons(self) -> NeuronState:
        """The published neurons (immutable; owners name their edits)."""
        return self._layer.state

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
