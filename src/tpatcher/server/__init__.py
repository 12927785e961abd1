"""HTTP service for tpatcher: OpenAI-compatible inference plus durable, authenticated edits.

``create_app`` builds the FastAPI app around a :class:`tpatcher.Patcher` and an
:class:`EditStore`; ``serve`` (in :mod:`.command`) is the ``tpatcher serve`` command.
FastAPI and uvicorn come from the ``serve`` extra, so they are imported only here.
"""

from __future__ import annotations

from .app import create_app
from .store import EditStore

__all__ = ["EditStore", "create_app"]
