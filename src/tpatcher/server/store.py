"""The service's durable store of edits: a tpatcher patch directory, appended to in place.

The format and the writing are the library's (:class:`tpatcher.persistence.PatchDirectory`
through :meth:`Patcher.save_edit` and :meth:`Patcher.remove_saved_edit`): ``manifest.json``
plus ``edits/<id>.safetensors``; the manifest, written last, is the commit point, so
``tpatcher info DIR`` and ``Patcher.load`` read a store.

Beside the manifest the store keeps ``journal.json``, written atomically *before* each
write: the ids whose response has not been acknowledged yet (``unacknowledged``) and the
ids being removed (``removing``). It explains what a crash leaves behind:

* an edit listed in the manifest but still ``unacknowledged`` was written durably, but the
  service died (or the client went away) before its response was sent; it is served, and
  ``GET /v1/edits`` shows it with ``acknowledged: false``;
* an edit file that no manifest lists is removed at start-up if the journal names it (a write
  or a removal was interrupted); an unlisted file the journal does not explain is refused.

:meth:`EditStore.check` runs before the model is loaded and refuses a damaged store with the
reason: a manifest whose checksum does not match, an edit listed twice, a listed edit whose
file is missing or damaged, an unexplained unlisted file, or a ``config`` the library cannot
use. Leftover temporaries of interrupted writes are removed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tpatcher import persistence
from tpatcher.config import PatcherConfig, settings_for
from tpatcher.errors import PatchDirectoryError
from tpatcher.patcher import Patcher

logger = logging.getLogger("tpatcher.server")

JOURNAL = "journal.json"


class EditStore:
    """One patch directory owned by one running service (written from its edit worker)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).expanduser()
        self._unacknowledged: set[str] = set()
        self._removing: set[str] = set()
        self._lock = threading.Lock()
        self._patcher: Patcher | None = None

    # -- opening -------------------------------------------------------------------------
    def check(self) -> dict[str, Any] | None:
        """Verify the store without a model; returns its manifest, or ``None`` for a new one.

        Raises :class:`PatchDirectoryError` with the reason. Run it before loading the model
        so that a damaged store fails in a second rather than after the model load.
        """
        directory = self.directory
        if directory.exists() and not directory.is_dir():
            raise PatchDirectoryError(f"store {directory} exists and is not a directory")
        self._remove_temporaries()
        if not (directory / persistence.MANIFEST).exists():
            self._check_empty()
            return None
        manifest = persistence.PatchDirectory(directory).read(verify_edits=True)
        try:
            PatcherConfig.from_manifest(manifest)
        except (TypeError, ValueError) as exc:
            raise PatchDirectoryError(
                f"store {directory} has a config this tpatcher cannot use: {exc}"
            ) from exc
        self._read_journal()
        listed = {str(e["id"]) for e in manifest["edits"]}
        self._check_unlisted(listed)
        self._unacknowledged &= listed
        self._removing.clear()
        return manifest

    def _check_empty(self) -> None:
        if not self.directory.is_dir():
            return
        allowed = {persistence.EDITS_DIR, JOURNAL}
        extra = sorted(p.name for p in self.directory.iterdir() if p.name not in allowed)
        if extra:
            raise PatchDirectoryError(
                f"store {self.directory} has no {persistence.MANIFEST} but is not empty "
                f"({', '.join(extra[:5])}); refusing to use it as an edit store"
            )

    def _remove_temporaries(self) -> None:
        for folder in (self.directory, self.directory / persistence.EDITS_DIR):
            if folder.is_dir():
                for path in folder.glob(".*.tmp"):
                    logger.info("removing %s, left by an interrupted write", path)
                    path.unlink(missing_ok=True)

    def _check_unlisted(self, listed: set[str]) -> None:
        folder = self.directory / persistence.EDITS_DIR
        files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
        unlisted = [p for p in files if p.stem not in listed]
        explained = self._unacknowledged | self._removing
        unexplained = [p.name for p in unlisted if p.stem not in explained]
        if unexplained:
            raise PatchDirectoryError(
                f"store {self.directory}: {', '.join(unexplained[:5])} in "
                f"{persistence.EDITS_DIR}/ is not listed in {persistence.MANIFEST} and no "
                "interrupted write explains it; move it out of the store (or restore the "
                "manifest that lists it)"
            )
        for path in unlisted:
            logger.warning("removing %s: its write or removal was interrupted", path.name)
            path.unlink(missing_ok=True)

    def _read_journal(self) -> None:
        path = self.directory / JOURNAL
        if not path.is_file():
            return
        try:
            data = json.loads(path.read_text("utf-8"))
            self._unacknowledged = {str(i) for i in data.get("unacknowledged", [])}
            self._removing = {str(i) for i in data.get("removing", [])}
        except (ValueError, AttributeError, TypeError) as exc:
            raise PatchDirectoryError(f"{path} is damaged: {exc}") from exc

    @staticmethod
    def config_from(manifest: dict[str, Any] | None) -> PatcherConfig:
        """The Patcher settings a store was made with (so new edits train the same way)."""
        return PatcherConfig() if manifest is None else PatcherConfig.from_manifest(manifest)

    def settings(self, manifest: dict[str, Any] | None, overrides: dict[str, Any]) -> PatcherConfig:
        """What new edits train with (:func:`tpatcher.config.settings_for`): a new store's
        are the defaults with ``overrides`` (``tpatcher serve --patcher``); an existing
        store keeps its own and refuses an override that differs from them."""
        hint = "serve it without that --patcher setting, or start a new store"
        try:
            return settings_for(manifest, overrides, f"store {self.directory}", hint)
        except ValueError as exc:
            raise PatchDirectoryError(str(exc)) from exc

    def open(self, patcher: Patcher, manifest: dict[str, Any] | None) -> None:
        """Load the store's edits into ``patcher`` (which refuses another model's store), or
        create an empty store stamped with this model's fingerprint."""
        with self._lock:
            self._patcher = patcher
            if manifest is None:
                patcher.save(self.directory)
                logger.info("created edit store %s", self.directory)
            else:
                patcher.load_edits(self.directory)
                logger.info("loaded %d edits from %s", len(patcher.edit_ids), self.directory)
            self._write_journal()

    # -- writing (edit worker only) --------------------------------------------------------
    def _write_journal(self) -> None:
        body = {"unacknowledged": sorted(self._unacknowledged), "removing": sorted(self._removing)}
        persistence.atomic_write(self.directory / JOURNAL, json.dumps(body).encode())

    def save(self, patcher: Patcher, edit_ids: Iterable[str]) -> dict[str, str]:
        """Make (pending) edits durable together, journalled as unacknowledged first.
        Raises if anything could not be written; then no manifest lists them."""
        ids = list(edit_ids)
        with self._lock:
            self._unacknowledged.update(ids)
            try:
                self._write_journal()
                return patcher.save_edit(self.directory, *ids)
            except BaseException:
                self._unacknowledged.difference_update(ids)  # the journal may keep them: harmless
                try:
                    patcher.patch_directory(self.directory).remove_unlisted()
                except OSError:
                    pass
                raise

    def remove(self, patcher: Patcher, edit_id: str) -> None:
        """Remove one edit from the store durably (the manifest without it, then its file).
        Raises if the manifest still lists it; a file left behind is removed at start-up."""
        with self._lock:
            self._removing.add(edit_id)
            try:
                self._write_journal()
                patcher.remove_saved_edit(self.directory, edit_id)
            except BaseException:
                if patcher.patch_directory(self.directory).sha256(edit_id) is not None:
                    self._removing.discard(edit_id)
                    raise  # still listed: nothing changed
                logger.warning("edit %s was removed, but its file may be left", edit_id)
                return
            self._removing.discard(edit_id)
            self._unacknowledged.discard(edit_id)
            self._write_journal_quietly()

    def acknowledge(self, edit_ids: Iterable[str]) -> None:
        """Record that the edits' response was sent (after it was)."""
        with self._lock:
            before = len(self._unacknowledged)
            self._unacknowledged.difference_update(edit_ids)
            if len(self._unacknowledged) != before:
                self._write_journal_quietly()

    def _write_journal_quietly(self) -> None:
        try:
            self._write_journal()
        except OSError as exc:  # only an acknowledgement is lost: logged, not fatal
            logger.warning("could not write %s: %s", self.directory / JOURNAL, exc)

    # -- reading -------------------------------------------------------------------------
    def acknowledged(self, edit_id: str) -> bool:
        return edit_id not in self._unacknowledged

    def sha256(self, edit_id: str) -> str | None:
        if self._patcher is None:
            return None
        return self._patcher.patch_directory(self.directory).sha256(edit_id)
