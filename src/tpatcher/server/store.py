"""The service's durable store of edits: a tpatcher patch directory, appended to in place.

The format is exactly :mod:`tpatcher.persistence` (``manifest.json`` + ``edits/<id>.safetensors``
with each file's SHA-256 in the manifest), so ``tpatcher info DIR`` and ``Patcher.load`` read
a store. The manifest is the commit point: an edit's file is written (tmp, fsync, rename)
before the manifest that names it, so a crash leaves either the old manifest or the new one,
never a listed file that is incomplete. Leftovers of an interrupted append (a temporary or
an edit file no manifest names) are unacknowledged and are removed at start-up.

Every check happens before the store is used: a damaged manifest, a file whose checksum does
not match, or a store made for another base model raises :class:`PatchDirectoryError`.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from tpatcher import persistence
from tpatcher.config import PatcherConfig
from tpatcher.errors import PatchDirectoryError
from tpatcher.patcher import Patcher

logger = logging.getLogger("tpatcher.server")


class EditStore:
    """One patch directory owned by one running service.

    All writes go through :meth:`append` and :meth:`remove`, which the app calls from its
    single edit worker, so the manifest always describes the patcher's committed edits.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._sha: dict[str, str] = {}
        self._lock = threading.Lock()

    # -- opening -------------------------------------------------------------------------
    def check(self) -> dict[str, Any] | None:
        """Read and verify the manifest and every edit file, without a model.

        Returns the manifest, or ``None`` for a new store. Run before loading the model so a
        damaged store fails in a second rather than after the model load.
        """
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise PatchDirectoryError(f"store {directory} exists and is not a directory")
        if not (directory / persistence.MANIFEST).exists():
            extra = (
                sorted(p.name for p in directory.iterdir() if p.name != persistence.EDITS_DIR)
                if directory.is_dir()
                else []
            )
            if extra:
                raise PatchDirectoryError(
                    f"store {directory} has no {persistence.MANIFEST} but is not empty "
                    f"({', '.join(extra[:5])}); refusing to use it as an edit store"
                )
            return None
        manifest = persistence.read_manifest(directory)
        for entry in manifest["edits"]:
            if not isinstance(entry, dict) or "id" not in entry:
                raise PatchDirectoryError(f"{directory}/{persistence.MANIFEST}: bad edit entry")
            persistence.read_edit(directory, entry)  # verifies the checksum
        return manifest

    @staticmethod
    def config_from(manifest: dict[str, Any] | None) -> PatcherConfig:
        """The Patcher settings a store was made with (so new edits train the same way)."""
        if manifest is None:
            return PatcherConfig()
        return PatcherConfig.from_manifest(manifest)

    def open(self, patcher: Patcher, manifest: dict[str, Any] | None) -> None:
        """Load the store's edits into ``patcher`` (refusing another model's store), or create
        an empty store stamped with this model's fingerprint."""
        with self._lock:
            if manifest is None:
                self.directory.mkdir(parents=True, exist_ok=True)
                persistence.write_manifest(self.directory, patcher.manifest())
                logger.info("created edit store %s", self.directory)
            else:
                patcher.add_saved_edits(self.directory, manifest)
                self._sha = {str(e["id"]): str(e["sha256"]) for e in manifest["edits"]}
                logger.info("loaded %d edits from %s", len(self._sha), self.directory)
            persistence.remove_unlisted(self.directory, set(self._sha))

    # -- writing -------------------------------------------------------------------------
    def _manifest(self, patcher: Patcher) -> dict[str, Any]:
        manifest = patcher.manifest()
        for entry in manifest["edits"]:
            entry["sha256"] = self._sha[entry["id"]]
        return manifest

    def append(self, patcher: Patcher, edit_id: str) -> str:
        """Make a committed edit durable: its file, then the manifest naming it."""
        with self._lock:
            self._sha[edit_id] = persistence.write_edit(
                self.directory, edit_id, patcher.edit_tensors(edit_id)
            )
            try:
                persistence.write_manifest(self.directory, self._manifest(patcher))
            except BaseException:
                self._sha.pop(edit_id, None)
                raise
            return self._sha[edit_id]

    def remove(self, patcher: Patcher, edit_id: str) -> None:
        """Roll an edit back durably: write the manifest without it, then drop its neurons
        and delete its file. If the manifest cannot be written, nothing changes."""
        with self._lock:
            manifest = self._manifest(patcher)
            manifest["edits"] = [e for e in manifest["edits"] if e["id"] != edit_id]
            persistence.write_manifest(self.directory, manifest)
            self._sha.pop(edit_id, None)
            patcher.rollback(edit_id)
            persistence.edit_file(self.directory, edit_id).unlink(missing_ok=True)

    def sha256(self, edit_id: str) -> str | None:
        return self._sha.get(edit_id)
