"""The interface every editing method implements, so the harness treats them alike.

An editor owns a model and changes it in place (new weights, hooks, or patch neurons); the
harness measures whatever ``editor.model`` now answers. ``edit`` is called once per item of
the stream, in order.

An editor may also define ``save_state(directory)`` and ``load_state(directory)``: the
harness then checkpoints it by saving its state into a fresh folder, and resumes by loading
that folder into a freshly built editor. Without them a resumed run replays the recorded
edits on a fresh model.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..encoding import MODEL_KINDS, Example, encode_edit
from ..patcher import Patcher


@dataclass
class EditOutcome:
    """What one edit did, in the harness's terms."""

    success: bool
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)


class Editor(ABC):
    """A sequential model editor: ``edit`` after ``edit`` on one model."""

    name: str = "editor"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @abstractmethod
    def edit(self, prompt: str, target: str | int) -> EditOutcome:
        """Make the model answer ``target`` (text, or a class label) to ``prompt``."""

    def settings(self) -> dict[str, Any]:
        """The method's settings, recorded with its results."""
        return {}


class BaselineEditor(Editor):
    """A baseline built from ``task``, ``locality_texts`` and keyword settings that fill its
    ``settings_class`` dataclass (an unknown setting is a TypeError, before any work)."""

    settings_class: type = object
    config: Any

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        task: str,
        locality_texts: list[str] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(model, tokenizer)
        if task not in MODEL_KINDS:
            raise ValueError(f"unknown task {task!r}; expected one of {', '.join(MODEL_KINDS)}")
        known = {f.name for f in fields(self.settings_class)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no setting(s) {', '.join(unknown)}")
        self.config = self.settings_class(**settings)
        self.task = task
        self.locality_texts = [t for t in (locality_texts or []) if t and t.strip()]
        self.num_edits = 0

    def settings(self) -> dict[str, Any]:
        return dict(asdict(self.config), method=self.name, task=self.task)

    def encode(self, prompt: str, target: str | int) -> Example:
        """The edit's tokens, exactly as every method (and T-Patcher) trains on them."""
        return encode_edit(
            self.tokenizer,
            self.model,
            prompt,
            target,
            task=self.task,
            add_space_before_target=getattr(self.config, "add_space_before_target", True),
        )


#: The file a baseline's :func:`write_state` writes into its checkpoint folder.
STATE_FILE = "state.safetensors"


def write_state(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """A baseline's checkpoint: its tensors in one safetensors file, everything else as JSON
    in the file's metadata (the harness writes each checkpoint into a fresh folder)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(flat, str(directory / STATE_FILE), metadata={"state": json.dumps(meta)})


def read_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and metadata :func:`write_state` saved in ``directory``."""
    with safe_open(str(Path(directory) / STATE_FILE), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
        meta = json.loads((handle.metadata() or {}).get("state", "{}"))
    return tensors, meta


class TPatcherEditor(Editor):
    """Transformer-Patcher through the public :class:`~tpatcher.Patcher` API."""

    name = "tpatcher"

    def __init__(self, patcher: Patcher) -> None:
        super().__init__(patcher.model, patcher.tokenizer)
        self.patcher = patcher
        self._saved: Path | None = None  # the last folder saved to or loaded from

    def edit(
        self,
        prompt: str,
        target: str | int,
        also: Sequence[str] = (),
        subject: str | None = None,
    ) -> EditOutcome:
        """One edit; ``also`` are other wordings trained with it and ``subject`` what it is
        about (``Patcher.edit(also=, subject=)``; a subject the prompt does not name, as a
        chat prompt may not, is dropped)."""
        start = time.perf_counter()
        subject = subject if subject and subject in prompt else None
        if self.patcher.task == "seq-cls":
            result = self.patcher.edit(prompt, label=int(target), subject=subject)
        else:
            result = self.patcher.edit(prompt, str(target), also=also, subject=subject)
        return EditOutcome(result.success, time.perf_counter() - start, result.to_dict())

    def settings(self) -> dict[str, Any]:
        return dict(self.patcher.config.to_dict(), memory_source=self.patcher.memory.source)

    def save_state(self, directory: Path) -> None:
        """The patch directory (edits, and the edit counter that seeds the next edit).

        The edit files of the last folder are hard-linked in first: the patch writer skips
        unchanged files and replaces changed ones atomically (never writing through a
        link), so a checkpoint writes only the new edits, not thousands of old ones."""
        directory = Path(directory)
        if self._saved is not None and self._saved != directory and self._saved.is_dir():
            _link_files(self._saved, directory)
        self.patcher.save(directory)
        self._saved = directory

    def load_state(self, directory: Path) -> None:
        """Load a :meth:`save_state` folder into this (freshly built) patcher; the edit
        counter continues from the saved one, so later edits match an uninterrupted run."""
        self.patcher.load_edits(directory)
        self._saved = Path(directory)


def _link_files(source: Path, target: Path) -> None:
    """Hard-link (or copy, where links are refused) ``source``'s edit files into ``target``."""
    for path in source.rglob("*.safetensors"):
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, dest)
        except FileExistsError:
            continue
        except OSError:
            shutil.copy2(path, dest)
