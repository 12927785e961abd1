"""The audit log: one JSON line per edit, rollback and refused edit request.

Lines go to the ``tpatcher.audit`` logger, for example::

    {"event": "edit", "who": "edit-token", "id": "3f2a...", "prompt_sha256": "...",
     "outcome": "applied", "seconds": 4.2}

``who`` names the token that was presented (``edit-token``, ``api-token`` or ``anonymous``),
never the token itself; prompts are logged as their SHA-256 only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from typing import Any

audit_logger = logging.getLogger("tpatcher.audit")


def audit(event: str, **fields: Any) -> None:
    """Write one audit line."""
    audit_logger.info(json.dumps({"event": event, **fields}, sort_keys=False, default=str))


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def _same(given: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def caller_name(service: Any, authorization: str | None) -> str:
    """Which configured token an ``Authorization`` header carries."""
    scheme, _, token = (authorization or "").partition(" ")
    if service is None or scheme.lower() != "bearer" or not token:
        return "anonymous"
    if _same(token.strip(), service.edit_token):
        return "edit-token"
    if _same(token.strip(), service.api_token):
        return "api-token"
    return "anonymous"
