"""Switching a Patcher's patch off and on, for every thread or for one, and removing it.

A mixin of :class:`tpatcher.Patcher`, which provides ``_layer`` (the
:class:`~tpatcher.layer.PatchLayer`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .layer import PatchLayer


class PatchSwitchMixin:
    """``disable``/``enable``, the ``disabled()`` context (peft's ``disable_adapter``), the
    per-thread ``unpatched_here()`` and ``close``."""

    _layer: PatchLayer

    def disable(self) -> None:
        """Answer with the base model until :meth:`enable`; edits are kept."""
        self._layer.enabled = False

    def enable(self) -> None:
        self._layer.enabled = True

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """``with patcher.disabled(): ...`` runs the unpatched model (for every thread)."""
        previous = self._layer.enabled
        self._layer.enabled = False
        try:
            yield
        finally:
            self._layer.enabled = previous

    disable_adapter = disabled  # the peft spelling

    @contextmanager
    def unpatched_here(self) -> Iterator[None]:
        """The base model for forward passes of this thread only; other threads keep being
        answered by the patched model (the service's side-by-side comparison)."""
        with self._layer.private(enabled=False):
            yield

    def close(self) -> None:
        """Remove the hooks: the model answers as the base model again."""
        self._layer.remove()
