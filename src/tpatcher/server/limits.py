"""The service's limits, importable without the ``serve`` extra (``tpatcher --help``)."""

from __future__ import annotations

from dataclasses import dataclass

#: Upper bound on ``max_tokens``; the server may lower it (``--max-tokens``).
MAX_TOKENS_LIMIT = 4096


@dataclass(frozen=True)
class Limits:
    """Per-request limits of the service (each has a ``tpatcher serve`` option)."""

    max_tokens: int = 512  #: cap on ``max_tokens`` of a completion
    max_edit_tokens: int = 256  #: longest edit prompt, in tokens (training time grows with it)
    edit_timeout: float = 300.0  #: seconds from accepting an edit to writing it
    max_body_bytes: int = 1 << 20  #: largest request body
