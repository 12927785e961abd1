"""Bearer-token checks, as FastAPI dependencies.

* inference (and ``/v1/compare``) needs the API token when one is configured;
* edits and rollbacks need the edit token; without one configured they are off (403);
* reading edits needs a token when editing is on (the edit token or the API token), and
  otherwise the API token when one is configured.

Each dependency returns the caller's name for the audit log (:func:`.audit.caller_name`).
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .audit import caller_name
from .service import Service

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <token>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


def _who(service: Service, creds: HTTPAuthorizationCredentials | None) -> str:
    header = f"Bearer {creds.credentials}" if creds is not None else None
    return caller_name(service, header)


def _matches(creds: HTTPAuthorizationCredentials | None, expected: str) -> bool:
    supplied = creds.credentials if creds is not None else ""
    return hmac.compare_digest(supplied.encode(), expected.encode())


def _unauthorised(what: str) -> HTTPException:
    return HTTPException(
        401, f"missing or wrong bearer token for {what}", headers={"WWW-Authenticate": "Bearer"}
    )


def require_api_token(service: ServiceDep, creds: Credentials) -> str:
    """Inference needs the API token, when one is configured."""
    if service.api_token is not None and not _matches(creds, service.api_token):
        raise _unauthorised("this endpoint")
    return _who(service, creds)


def require_edit_token(service: ServiceDep, creds: Credentials) -> str:
    """Edits and rollbacks always need the edit token; without one they are disabled."""
    if service.edit_token is None:
        raise HTTPException(
            403,
            "editing is disabled on this server: start it with --edit-token "
            "(or TPATCHER_EDIT_TOKEN) to enable edits and rollbacks",
        )
    if not _matches(creds, service.edit_token):
        raise _unauthorised("edits")
    return "edit-token"


def require_reader(service: ServiceDep, creds: Credentials) -> str:
    """Listing edits: the edit or API token when editing is on, else as inference."""
    who = _who(service, creds)
    if service.edit_token is not None:
        if who == "anonymous":
            raise _unauthorised("reading edits (the edit token or the API token)")
        return who
    return require_api_token(service, creds)


ApiCaller = Annotated[str, Depends(require_api_token)]
EditCaller = Annotated[str, Depends(require_edit_token)]
Reader = Annotated[str, Depends(require_reader)]
