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

import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

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


class TPatcherEditor(Editor):
    """Transformer-Patcher through the public :class:`~tpatcher.Patcher` API."""

    name = "tpatcher"

    def __init__(self, patcher: Patcher) -> None:
        super().__init__(patcher.model, patcher.tokenizer)
        self.patcher = patcher
        self._saved: Path | None = None  # the last folder saved to or loaded from

    def edit(self, prompt: str, target: str | int, also: Sequence[str] = ()) -> EditOutcome:
        """One edit; ``also`` are other wordings trained with it (``Patcher.edit(also=)``)."""
        start = time.perf_counter()
        if self.patcher.task == "seq-cls":
            result = self.patcher.edit(prompt, label=int(target))
        else:
            result = self.patcher.edit(prompt, str(target), also=also)
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
