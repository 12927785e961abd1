"""HTTP service for tpatcher: OpenAI-compatible inference plus durable, authenticated edits.

``create_app`` builds the FastAPI app around a :class:`tpatcher.Patcher` and an
:class:`EditStore`; ``serve`` (in :mod:`.command`) is the ``tpatcher serve`` command.
FastAPI and uvicorn come from the ``serve`` extra, so they are imported on first use of
``create_app`` or ``EditStore`` (module ``__getattr__``), never by importing this package:
``tpatcher --help`` works without the extra.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .store import EditStore

__all__ = ["EditStore", "create_app"]

_LAZY = {"create_app": ".app", "EditStore": ".store"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
