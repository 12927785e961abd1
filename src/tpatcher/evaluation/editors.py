"""The interface every editing method implements, so the harness treats them alike.

An editor owns a model and changes it in place (new weights, hooks, or patch neurons); the
harness measures whatever ``editor.model`` now answers. ``edit`` is called once per item of
the stream, in order.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
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

    def edit(self, prompt: str, target: str | int) -> EditOutcome:
        start = time.perf_counter()
        if self.patcher.task == "seq-cls":
            result = self.patcher.edit(prompt, label=int(target))
        else:
            result = self.patcher.edit(prompt, str(target))
        return EditOutcome(result.success, time.perf_counter() - start, result.to_dict())

    def settings(self) -> dict[str, Any]:
        return dict(self.patcher.config.to_dict(), memory_source=self.patcher.memory.source)
