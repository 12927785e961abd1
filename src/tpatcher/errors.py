"""Exceptions raised by tpatcher.

Every user-facing failure is a subclass of :class:`TPatcherError`, so callers (the CLI, the
service) can turn it into a clear message without catching unrelated bugs.
"""

from __future__ import annotations


class TPatcherError(Exception):
    """Base class of every error tpatcher raises on purpose."""


class InvalidEditError(TPatcherError, ValueError):
    """The edit request itself is unusable (empty prompt, empty target, label out of range...)."""


class UnsupportedModelError(TPatcherError, ValueError):
    """The model's architecture is not in the adapter table and no override was given."""


class ModelNotFoundError(TPatcherError, FileNotFoundError):
    """A model name or path could not be resolved to weights on this machine."""


class PatchDirectoryError(TPatcherError):
    """A patch directory is missing, damaged, or belongs to another base model."""


class TrainingError(TPatcherError, RuntimeError):
    """Training an edit broke down (for example a NaN loss); the model was left unchanged."""


class UnknownEditError(TPatcherError, KeyError):
    """No edit with the given id exists."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "unknown edit"
