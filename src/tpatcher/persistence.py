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

FORMAT = "tpatcher-patch"
VERSION = 1
MANIFEST = "manifest.json"
EDITS_DIR = "edits"
_EDIT_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    body = dict(manifest, format=FORMAT, version=VERSION)
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
