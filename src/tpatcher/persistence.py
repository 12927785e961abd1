"""Saving and loading the added neurons alone, atomically and verifiably.

A patch directory holds ``manifest.json`` and one safetensors file per edit under
``edits/``. Each edit file is written to a temporary name, flushed to disk and renamed; the
manifest, which lists every edit with the SHA-256 of its file, is written the same way and is
the single commit point. A crash at any moment leaves either the old or the new manifest, and
every file a manifest names is complete. Files no manifest names are removed only after the
new manifest is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .errors import PatchDirectoryError
from .layer import NeuronState, PatchLayer

FORMAT = "tpatcher-patch"
VERSION = 1
MANIFEST = "manifest.json"
EDITS_DIR = "edits"
_EDIT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_edit_id(edit_id: str) -> bool:
    """Edit ids name files: letters, digits, ``_`` and ``-``, at most 64 characters."""
    return bool(_EDIT_ID.match(edit_id))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def edit_file(directory: Path, edit_id: str) -> Path:
    if not _EDIT_ID.match(edit_id):
        raise PatchDirectoryError(f"invalid edit id {edit_id!r} in {directory}")
    return directory / EDITS_DIR / f"{edit_id}.safetensors"


def write_edit(directory: Path, edit_id: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write one edit's tensors; return the file's SHA-256."""
    data = save_bytes({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    path = edit_file(directory, edit_id)
    digest = sha256_bytes(data)
    if path.exists() and sha256_bytes(path.read_bytes()) == digest:
        return digest
    atomic_write(path, data)
    return digest


def manifest_checksum(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its own ``checksum`` field."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    body = dict(manifest, format=FORMAT, version=VERSION)
    body["checksum"] = manifest_checksum(body)
    atomic_write(directory / MANIFEST, json.dumps(body, indent=2, sort_keys=True).encode())


def remove_unlisted(directory: Path, keep: set[str]) -> None:
    """Delete edit files (and stale temporaries) that the manifest no longer names."""
    folder = directory / EDITS_DIR
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif path.suffix == ".safetensors" and path.stem not in keep:
            path.unlink(missing_ok=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise PatchDirectoryError(f"{directory} is not a patch directory: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PatchDirectoryError(f"{path} is damaged: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise PatchDirectoryError(f"{path} is not a tpatcher manifest")
    if manifest.get("version") != VERSION:
        raise PatchDirectoryError(
            f"{path} has format version {manifest.get('version')}; this tpatcher reads {VERSION}"
        )
    if not isinstance(manifest.get("edits"), list):
        raise PatchDirectoryError(f"{path} is damaged: 'edits' is not a list")
    checksum = manifest.get("checksum")  # patches saved before it existed have none
    if checksum is not None and checksum != manifest_checksum(manifest):
        raise PatchDirectoryError(
            f"{path} is damaged or was edited by hand: its checksum does not match its content"
        )
    seen: set[str] = set()
    for entry in manifest["edits"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise PatchDirectoryError(f"{path} is damaged: an edit entry has no id")
        if entry["id"] in seen:
            raise PatchDirectoryError(f"{path} lists edit {entry['id']} twice")
        seen.add(entry["id"])
    return manifest


def read_edit(directory: Path, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Read and verify one edit's tensors against the checksum in its manifest entry."""
    edit_id = str(entry.get("id", ""))
    path = edit_file(Path(directory), edit_id)
    if not path.is_file():
        raise PatchDirectoryError(f"edit {edit_id}: file {path} is missing")
    data = path.read_bytes()
    if sha256_bytes(data) != entry.get("sha256"):
        raise PatchDirectoryError(f"edit {edit_id}: file {path} is damaged (checksum mismatch)")
    try:
        return load_bytes(data)
    except Exception as exc:
        raise PatchDirectoryError(f"edit {edit_id}: file {path} is unreadable: {exc}") from exc


class PatchDirectory:
    """The one writer of a patch directory: whole saves, and incremental append and remove.

    ``manifest`` arguments are the full manifest without checksums of edit files; the
    SHA-256 of every edit file this object wrote or read is remembered, so appending one
    edit to a directory of thousands writes one edit file and the manifest.
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory).expanduser()
        self._sha: dict[str, str] = {}

    def sha256(self, edit_id: str) -> str | None:
        return self._sha.get(edit_id)

    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def read(self, *, verify_edits: bool = False) -> dict[str, Any]:
        """The manifest (checked); with ``verify_edits`` every edit file's checksum too."""
        manifest = read_manifest(self.path)
        for entry in manifest["edits"]:
            if verify_edits:
                read_edit(self.path, entry)
            self._sha[str(entry["id"])] = str(entry.get("sha256"))
        return manifest

    def read_edit(self, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
        return read_edit(self.path, entry)

    def _with_sha(self, manifest: dict[str, Any]) -> dict[str, Any]:
        edits = [dict(e, sha256=self._sha[str(e["id"])]) for e in manifest["edits"]]
        return dict(manifest, edits=edits)

    def save(self, manifest: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        """Write every edit file (unchanged ones are skipped), then the manifest, then drop
        files no manifest names."""
        for entry in manifest["edits"]:
            edit_id = str(entry["id"])
            self._sha[edit_id] = write_edit(self.path, edit_id, tensors[edit_id])
        self.path.mkdir(parents=True, exist_ok=True)
        write_manifest(self.path, self._with_sha(manifest))
        keep = {str(e["id"]) for e in manifest["edits"]}
        self._sha = {k: v for k, v in self._sha.items() if k in keep}
        remove_unlisted(self.path, keep)

    def append(
        self, manifest: dict[str, Any], tensors: dict[str, dict[str, torch.Tensor]]
    ) -> dict[str, str]:
        """Make edits durable together: their files, then one manifest that lists them all
        (the commit point: all of them or none). Returns each file's SHA-256."""
        listed = {str(e["id"]) for e in manifest["edits"]}
        missing = sorted(set(tensors) - listed)
        if missing:
            raise ValueError(f"the manifest does not list edit {missing[0]}")
        previous = dict(self._sha)
        try:
            digests = {i: write_edit(self.path, i, t) for i, t in tensors.items()}
            self._sha.update(digests)
            write_manifest(self.path, self._with_sha(manifest))
        except BaseException:
            self._sha = previous
            raise
        return digests

    def remove(self, manifest: dict[str, Any], edit_id: str) -> None:
        """Remove one edit durably: the manifest without it first, then its file."""
        if edit_id in {str(e["id"]) for e in manifest["edits"]}:
            raise ValueError(f"the manifest still lists edit {edit_id}")
        write_manifest(self.path, self._with_sha(manifest))
        self._sha.pop(edit_id, None)
        edit_file(self.path, edit_id).unlink(missing_ok=True)

    def remove_unlisted(self) -> None:
        """Delete leftovers (temporaries, unlisted edit files) of an interrupted write."""
        remove_unlisted(self.path, set(self._sha))
        for path in self.path.glob(f".{MANIFEST}.*.tmp"):
            path.unlink(missing_ok=True)


def edit_tensors(state: NeuronState, memory: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors saved for one edit: its neurons (``state``) and its memory vectors."""
    tensors = {"keys": state.keys, "values": state.values, "memory": memory}
    if state.up_keys is not None:
        tensors["up_keys"] = state.up_keys
    if state.biases is not None:
        tensors["biases"] = state.biases
    return tensors


def state_from_tensors(
    edit_id: str, tensors: dict[str, torch.Tensor], layer: PatchLayer, where: object
) -> NeuronState:
    """One saved edit's neurons, checked against the FFN's form and moved to the layer."""
    keys, values = tensors.get("keys"), tensors.get("values")
    up, biases = tensors.get("up_keys"), tensors.get("biases")
    bad = (
        keys is None
        or values is None
        or keys.ndim != 2
        or keys.shape[1] != layer.hidden_size
        or values.shape != keys.shape
        or (layer.gated != (up is not None))
        or (up is not None and up.shape != keys.shape)
        or (layer.has_bias != (biases is not None))
        or (biases is not None and biases.shape != (keys.shape[0],))
    )
    if bad:
        raise PatchDirectoryError(f"edit {edit_id} in {where} does not fit this model's FFN")

    def to(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=layer.device, dtype=layer.dtype)

    return NeuronState(
        keys=to(keys),  # type: ignore[arg-type]
        values=to(values),  # type: ignore[arg-type]
        up_keys=to(up),
        biases=to(biases),
        owners=(edit_id,) * keys.shape[0],  # type: ignore[union-attr]
    )
