"""Edits and rollbacks in the service: two-phase, durable, one at a time.

Every edit (and every batch of edits) goes through the single edit thread:

1. **prepare**: :meth:`Patcher.edit` with ``publish=False`` trains and verifies the new
   neurons on the real model; only the edit thread sees them;
2. **write**: :meth:`EditStore.save` writes their files and *one* manifest listing them all
   (the commit point);
3. **publish**: :meth:`Patcher.publish` swaps them in for every thread at once;
4. the response is sent; a background task then records the acknowledgement.

If anything fails before the write has committed (training error, deadline, full disk), the
pending edits are discarded: no generation ever saw them and the store does not list them.
A batch is all or nothing in that sense: an exception in any item discards every item.
An item that trains but cannot be fixed is reported with ``success: false`` and no id.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from tpatcher.errors import TrainingError, UnknownEditError
from tpatcher.patcher import EditResult, Patcher
from tpatcher.wordings import chat_wordings

from .audit import audit, prompt_sha256
from .errors import ServiceError
from .metrics import Metrics
from .schemas import EditResponse
from .store import EditStore

logger = logging.getLogger("tpatcher.server")

T = TypeVar("T")
TRAINING_FAILED = "training failed, model unchanged"


class EditTimeout(Exception):
    """The edit's deadline passed; raised from the training progress callback."""


class PendingCounter:
    """Edits accepted and not finished. Reserved on the event loop and released on the edit
    thread (or wherever a queued job is cancelled), so every change holds a lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def reserve(self, n: int) -> bool:
        """Count ``n`` more edits, unless that would pass the limit."""
        with self._lock:
            if self._count + n > self.limit:
                return False
            self._count += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self._count -= n


@dataclass(frozen=True)
class EditJob:
    """One validated edit: the rendered prompt, the target, other wordings to train with it
    and, for ``wordings="auto"``, the question whose bare form and answer lead join them;
    the ``subject`` the prompt names."""

    prompt: str
    target: str
    also: tuple[str, ...] = ()
    question: str | None = None
    subject: str | None = None

    @property
    def sha256(self) -> str:
        return prompt_sha256(self.prompt)


class EditRunner:
    """The edit thread, and the two-phase edit and the durable rollback that run on it."""

    def __init__(
        self, patcher: Patcher, store: EditStore, metrics: Metrics, *, timeout: float, limit: int
    ) -> None:
        self.patcher = patcher
        self.store = store
        self.metrics = metrics
        self.timeout = timeout
        self.pending = PendingCounter(limit)
        self.editing = False
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tpatcher-edit")

    def stop(self) -> None:
        """Wait for the running job (its write completes); queued ones were never answered."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    async def run(self, fn: Callable[[], T], *, reserved: int = 0) -> T:
        """Run ``fn`` on the edit thread; ``reserved`` pending edits are released when done."""
        if self._pool is None:
            raise RuntimeError("the edit worker is not started")
        future = self._pool.submit(fn)
        if reserved:
            future.add_done_callback(lambda _: self.pending.release(reserved))
        return await asyncio.wrap_future(future)

    # -- edits ---------------------------------------------------------------------------
    async def apply(self, jobs: list[EditJob], who: str) -> list[EditResponse]:
        """Queue ``jobs`` as one batch; 503 when too many edits are waiting."""
        if self._pool is None:
            raise RuntimeError("the edit worker is not started")
        if not self.pending.reserve(len(jobs)):
            raise ServiceError(
                503, "too many edits queued; retry later", "server_busy", "edit_queue_full"
            )
        deadline = time.monotonic() + self.timeout  # queueing counts: the client is waiting
        return await self.run(lambda: self._batch(jobs, deadline, who), reserved=len(jobs))

    def _batch(self, jobs: list[EditJob], deadline: float, who: str) -> list[EditResponse]:
        """Prepare, write and publish ``jobs`` (edit thread)."""
        start = time.perf_counter()
        self.editing = True
        try:
            results = self._prepare_and_write(jobs, deadline)
        except EditTimeout as exc:
            self._failed(jobs, "timeout", who, start)
            raise ServiceError(
                504,
                f"the edit did not finish within {self.timeout:g} s (--edit-timeout); "
                "nothing was applied",
                "timeout",
                "edit_timeout",
                limit=self.timeout,
            ) from exc
        except ServiceError:
            self._failed(jobs, "store_error", who, start)
            raise
        except BaseException:
            self._failed(jobs, "error", who, start)
            raise
        finally:
            self.editing = False
        ids = [r.edit_id for r in results if r.edit_id]
        if ids:
            self.patcher.publish(*ids)
        return [self._report(job, r, who) for job, r in zip(jobs, results, strict=True)]

    def _prepare_and_write(self, jobs: list[EditJob], deadline: float) -> list[EditResult]:
        """Train every job unpublished, then write them durably; discard all on failure."""
        results: list[EditResult] = []
        try:
            for job in jobs:
                _check(deadline)
                results.append(self._train(job, deadline))
            ids = [r.edit_id for r in results if r.edit_id]
            if ids:
                _check(deadline)
                self._write(ids)
        except BaseException:
            pending = [r.edit_id for r in results if r.edit_id]
            if pending:
                self.patcher.discard(*pending)
            raise
        return results

    def _train(self, job: EditJob, deadline: float) -> EditResult:
        def progress(step: int, losses: dict[str, float]) -> None:
            _check(deadline)

        also = list(job.also)
        if job.question is not None:
            also += chat_wordings(self.patcher, job.question, job.target)
        try:
            return self.patcher.edit(
                job.prompt,
                job.target,
                publish=False,
                progress=progress,
                also=also,
                subject=job.subject,
            )
        except TrainingError as exc:
            return EditResult(None, False, 0, 0.0, 0, message=f"{TRAINING_FAILED}: {exc}")

    def _write(self, ids: list[str]) -> None:
        try:
            self.store.save(self.patcher, ids)
        except Exception as exc:
            logger.exception("could not write edits %s to the store", ", ".join(ids))
            self.metrics.inc("tpatcher_errors_total", "Server errors", kind="store")
            raise ServiceError(
                500,
                f"the edit could not be written to the store, so it was not applied: {exc}",
                "server_error",
                "store_write_failed",
            ) from exc

    # -- reporting -----------------------------------------------------------------------
    def _count(self, outcome: str, seconds: float) -> None:
        self.metrics.inc("tpatcher_edits_total", "Edit requests", outcome=outcome)
        help_ = "Time to train, verify and store an edit"
        self.metrics.observe("tpatcher_edit_seconds", help_, seconds, outcome=outcome)

    def _failed(self, jobs: list[EditJob], outcome: str, who: str, start: float) -> None:
        seconds = time.perf_counter() - start
        for job in jobs:
            self._count(outcome, seconds)
            audit("edit", who=who, id=None, prompt_sha256=job.sha256, outcome=outcome)

    def _report(self, job: EditJob, result: EditResult, who: str) -> EditResponse:
        if result.already_correct:
            outcome = "already_correct"
        elif result.edit_id:
            outcome = "applied"
        else:
            failed = result.message.startswith(TRAINING_FAILED)
            outcome = "training_error" if failed else "not_fixed"
        self._count(outcome, result.seconds)
        audit(
            "edit",
            who=who,
            id=result.edit_id,
            prompt_sha256=job.sha256,
            outcome=outcome,
            seconds=round(result.seconds, 3),
        )
        return EditResponse(
            id=result.edit_id,
            success=result.success,
            already_correct=result.already_correct,
            steps=result.steps,
            seconds=round(result.seconds, 4),
            neurons=result.neurons,
            message=result.message,
            losses={k: float(v) for k, v in result.losses.items()},
        )

    # -- rollbacks -----------------------------------------------------------------------
    async def rollback(self, edit_id: str, who: str) -> None:
        """Remove an edit durably, then from the model, after the edits queued before it."""
        await self.run(lambda: self._rollback(edit_id, who))

    def _rollback(self, edit_id: str, who: str) -> None:
        record = self.patcher.get_edit(edit_id)
        if record is None:
            raise UnknownEditError(f"no edit with id {edit_id!r}")
        sha = prompt_sha256(record.prompt)
        try:
            self.store.remove(self.patcher, edit_id)
        except Exception as exc:
            logger.exception("could not remove edit %s from the store", edit_id)
            self.metrics.inc("tpatcher_errors_total", "Server errors", kind="store")
            audit("rollback", who=who, id=edit_id, prompt_sha256=sha, outcome="store_error")
            raise ServiceError(
                500,
                f"the edit could not be removed from the store, so it is kept: {exc}",
                "server_error",
                "store_write_failed",
            ) from exc
        self.patcher.rollback(edit_id)
        self.metrics.inc("tpatcher_rollbacks_total", "Edits rolled back")
        audit("rollback", who=who, id=edit_id, prompt_sha256=sha, outcome="removed")

    def acknowledge(self, edit_ids: list[str]) -> None:
        """Record that the edits' response went out (a background task after sending)."""
        self.store.acknowledge(edit_ids)


def _check(deadline: float) -> None:
    if time.monotonic() > deadline:
        raise EditTimeout
