"""What the routes share: the patcher, the store, the workers, the limits and the counters.

Concurrency model: completions are decoded in batches on one scheduler thread, and
``compare`` on a small thread pool (:class:`.generation.Generator`);
edits and rollbacks run one at a time, in arrival order, on one edit thread
(:class:`.edits.EditRunner`), two-phase: an edit is trained and verified where only its own
thread sees it, written durably, and only then published to every thread.
"""

from __future__ import annotations

import time

from tpatcher.encoding import render_chat, tokenize
from tpatcher.errors import InvalidEditError
from tpatcher.patcher import Patcher
from tpatcher.subject_guess import guess_subject
from tpatcher.subject_negatives import check_subject

from .edits import EditJob, EditRunner
from .errors import ServiceError
from .generation import DEFAULT_MAX_BATCH, Generator
from .limits import Limits
from .metrics import Metrics
from .schemas import ChatMessage, EditInfo, EditRequest
from .store import EditStore

#: Edits (batch items count one each) waiting for the edit thread before new ones get 503.
MAX_PENDING_EDITS = 64


class Service:
    """The service's state: the patcher, its store, its workers and counters."""

    def __init__(
        self,
        patcher: Patcher,
        store: EditStore,
        *,
        model_name: str,
        edit_token: str | None,
        api_token: str | None,
        generation_workers: int,
        limits: Limits,
        max_batch: int = DEFAULT_MAX_BATCH,
    ) -> None:
        self.patcher = patcher
        self.tokenizer = patcher.tokenizer
        self.store = store
        self.model_name = model_name
        self.edit_token = edit_token or None
        self.api_token = api_token or None
        self.limits = limits
        self.metrics = Metrics()
        self.generator = Generator(patcher, generation_workers, max_batch)
        self.edits = EditRunner(
            patcher, store, self.metrics, timeout=limits.edit_timeout, limit=MAX_PENDING_EDITS
        )
        self.started = time.time()
        self._register_gauges()

    def _register_gauges(self) -> None:
        m, p = self.metrics, self.patcher
        m.gauge("tpatcher_store_edits", "Edits in the store", lambda: len(p.edit_ids))
        m.gauge("tpatcher_neurons", "Patch neurons in the model", lambda: p.num_neurons)
        m.gauge(
            "tpatcher_edit_in_progress", "1 while an edit trains", lambda: int(self.edits.editing)
        )
        m.gauge(
            "tpatcher_edits_pending", "Edits queued or training", lambda: self.edits.pending.count
        )
        m.gauge("tpatcher_uptime_seconds", "Seconds up", lambda: time.time() - self.started)

    def start(self) -> None:
        """Start the workers; with editing on, build the memory bank first, so the first
        edit does not pay for it."""
        if self.edit_token is not None:
            _ = self.patcher.memory
        self.generator.start()
        self.edits.start()

    def stop(self) -> None:
        """Finish the running edit (its write completes), then the generation threads."""
        self.edits.stop()
        self.generator.stop()

    # -- requests ------------------------------------------------------------------------
    def check_request(self, model: str, max_tokens: int) -> None:
        """404 for another model's name; 400 over the server's ``max_tokens`` cap."""
        if model not in (self.model_name, self.patcher.base_model_name):
            raise ServiceError(
                404,
                f"model {model!r} not found; this server serves {self.model_name!r}",
                "invalid_request_error",
                "model_not_found",
            )
        if max_tokens > self.limits.max_tokens:
            raise ServiceError(
                400,
                f"max_tokens={max_tokens} exceeds this server's limit of {self.limits.max_tokens}",
                "invalid_request_error",
                limit=self.limits.max_tokens,
            )

    def render_chat(self, messages: list[ChatMessage]) -> str:
        """The chat as the model's template renders it (:func:`tpatcher.encoding.render_chat`)."""
        try:
            return render_chat(self.tokenizer, [m.model_dump() for m in messages])
        except InvalidEditError as exc:
            raise ServiceError(400, f"{exc}; use /v1/completions", "invalid_request_error") from exc

    def edit_jobs(self, items: list[EditRequest]) -> list[EditJob]:
        """Validate every item before any trains (nothing changes if one is bad)."""
        jobs = []
        for i, item in enumerate(items):
            where = f"edits[{i}]: " if len(items) > 1 else ""
            prompt = item.prompt if item.messages is None else self.render_chat(item.messages)
            assert prompt is not None
            question = item.messages[0].content if item.wordings == "auto" else None
            for text in (prompt, *item.also, *([question] if question else [])):
                self._check_edit_prompt(text, item.target, where)
            try:
                check_subject(item.subject, prompt)
            except InvalidEditError as exc:
                raise ServiceError(400, f"{where}{exc}", "invalid_request_error") from exc
            subject = item.subject or self._guessed_subject(item, prompt)
            jobs.append(EditJob(prompt, item.target, tuple(item.also), question, subject))
        return jobs

    def _guessed_subject(self, item: EditRequest, prompt: str) -> str | None:
        """Where the patcher trains subject-swap negatives and the request names no subject:
        the one its last user message (or raw prompt) names, by :func:`guess_subject`."""
        config = self.patcher.config
        if not config.subject_negatives + config.known_subject_negatives:
            return None
        users = [m.content for m in item.messages or () if m.role == "user"]
        text = users[-1] if users else item.prompt
        guess = guess_subject(text) if text else None
        return guess if guess and guess in prompt else None

    def _check_edit_prompt(self, prompt: str, target: str, where: str) -> None:
        """Refuse a wording over the token limit, or one that cannot be trained on."""
        limit = self.limits.max_edit_tokens
        n = len(tokenize(self.tokenizer, prompt)["input_ids"])
        if n > limit:
            raise ServiceError(
                422,
                f"{where}the edit prompt is {n} tokens; this server accepts edit prompts "
                f"of at most {limit} tokens (--max-edit-tokens)",
                "invalid_request_error",
                "edit_prompt_too_long",
                limit=limit,
            )
        try:
            self.patcher.encode(prompt, target)
        except InvalidEditError as exc:
            raise ServiceError(400, f"{where}{exc}", "invalid_request_error") from exc

    def edit_info(self, edit_id: str) -> EditInfo:
        info = self._info(edit_id)
        if info is None:
            raise ServiceError(404, f"no edit with id {edit_id!r}", "not_found", "edit_not_found")
        return info

    def list_edits(self) -> list[EditInfo]:
        """Published edits, oldest first (one rolled back meanwhile is left out)."""
        return [info for i in self.patcher.edit_ids if (info := self._info(i)) is not None]

    def _info(self, edit_id: str) -> EditInfo | None:
        record = self.patcher.get_edit(edit_id)
        if record is None:
            return None
        return EditInfo(
            **record.to_manifest(),
            sha256=self.store.sha256(edit_id),
            acknowledged=self.store.acknowledged(edit_id),
        )
