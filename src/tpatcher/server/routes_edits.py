"""Edits: create (one, or a batch), list, read, roll back.

``POST`` answers only after the edit is written durably and published. After a crash the
edit may nevertheless be present *unacknowledged*: written and served, but the response was
never sent. ``GET /v1/edits`` shows such edits with ``acknowledged: false``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Path, Response

from .auth import EditCaller, Reader, ServiceDep
from .schemas import (
    DeletedEdit,
    EditBatchRequest,
    EditBatchResponse,
    EditInfo,
    EditList,
    EditRequest,
    EditResponse,
    ErrorResponse,
)

EditIdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$", max_length=64)]

router = APIRouter(
    responses={
        400: {"model": ErrorResponse},
        401: {"model": ErrorResponse},
        403: {"model": ErrorResponse},
    }
)

_POST_ERRORS = {
    413: {"model": ErrorResponse, "description": "the request body is too large"},
    422: {"model": ErrorResponse, "description": "an edit prompt is over the token limit"},
    500: {
        "model": ErrorResponse,
        "description": "the edit could not be written; it was not applied",
    },
    503: {"model": ErrorResponse, "description": "too many edits queued"},
    504: {"model": ErrorResponse, "description": "the edit's deadline passed; not applied"},
}


@router.post("/v1/edits", response_model=EditResponse, responses=_POST_ERRORS)
async def create_edit(
    body: EditRequest,
    response: Response,
    background: BackgroundTasks,
    service: ServiceDep,
    who: EditCaller,
) -> EditResponse:
    """Train a patch so that the prompt is answered with ``target``: 201 when a new edit
    was stored, 200 when nothing changed (already correct, or training did not fix it).

    The edit is written durably, then published, then answered. If the service stops (or
    the connection drops) between the write and the response, the edit is kept and served
    but listed with ``acknowledged: false``: check ``GET /v1/edits`` before retrying."""
    (result,) = await service.edits.apply(service.edit_jobs([body]), who)
    response.status_code = 201 if result.id else 200
    if result.id:
        background.add_task(service.edits.acknowledge, [result.id])
    return result


@router.post("/v1/edits:batch", response_model=EditBatchResponse, responses=_POST_ERRORS)
async def create_edits(
    body: EditBatchRequest,
    response: Response,
    background: BackgroundTasks,
    service: ServiceDep,
    who: EditCaller,
) -> EditBatchResponse:
    """Several edits, validated together, trained in list order (each sees the ones before
    it), then written with one manifest write and published at once; ``results[i]``
    answers ``edits[i]``. An error in any item applies none of them. Acknowledgement as
    for ``POST /v1/edits``."""
    results = await service.edits.apply(service.edit_jobs(body.edits), who)
    ids = [r.id for r in results if r.id]
    response.status_code = 201 if ids else 200
    if ids:
        background.add_task(service.edits.acknowledge, ids)
    return EditBatchResponse(results=results)


@router.get("/v1/edits", response_model=EditList)
async def list_edits(service: ServiceDep, _: Reader) -> EditList:
    """Every stored edit, oldest first, with its provenance and whether it was
    acknowledged."""
    patcher = service.patcher
    return EditList(
        base_model=patcher.base_model_name,
        fingerprint=patcher.fingerprint,
        neurons=patcher.num_neurons,
        data=service.list_edits(),
    )


@router.get("/v1/edits/{edit_id}", response_model=EditInfo)
async def get_edit(edit_id: EditIdPath, service: ServiceDep, _: Reader) -> EditInfo:
    return service.edit_info(edit_id)


@router.delete("/v1/edits/{edit_id}", response_model=DeletedEdit)
async def delete_edit(edit_id: EditIdPath, service: ServiceDep, who: EditCaller) -> DeletedEdit:
    """Roll the edit back, durably, after any edits queued before this request."""
    await service.edits.rollback(edit_id, who)
    return DeletedEdit(id=edit_id)
