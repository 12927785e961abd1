"""The browser console at ``/ui``: list, try, add and roll back edits on a running server.

The page is plain HTML, CSS and JavaScript from ``static/`` (package data), with no build step
and no external assets. It talks to the service's own JSON API; tokens live in the tab's
``sessionStorage`` and are sent only in ``Authorization`` headers. A strict
Content-Security-Policy (no inline script, same-origin only, no form submission) backs that
up, so untrusted prompts and targets can never run as code.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse, Response

router = APIRouter(include_in_schema=False)

#: Files the console may serve, with their media types (nothing else under static/ is exposed).
ASSETS = {
    "console.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}

#: Same-origin everything; no inline script or style; forms cannot submit anywhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@lru_cache(maxsize=len(ASSETS))
def asset(name: str) -> bytes:
    """The bytes of one console file, read once from the package."""
    return resources.files("tpatcher.server").joinpath("static", name).read_bytes()


def _serve(name: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no console file {name!r}")
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)


@router.get("/ui")
def console_page() -> Response:
    """The console page."""
    return _serve("console.html")


@router.get("/ui/")
def console_slash() -> RedirectResponse:
    """``/ui/`` is ``/ui`` (relative asset URLs are written for ``/ui``)."""
    return RedirectResponse("../ui", status_code=308)


@router.get("/ui/static/{name}")
def console_asset(name: str) -> Response:
    """The console's script and style sheet."""
    return _serve(name)
