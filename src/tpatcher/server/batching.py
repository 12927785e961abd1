"""Continuous batching: concurrent requests share forward passes on one scheduler thread.

Why our own and not ``transformers``' ``ContinuousBatchingManager``: that one takes
``do_sample`` from one generation config for all requests (a greedy and a sampled request
cannot share it) and switches the shared model to paged attention, which the edit thread
and ``compare`` also use; here greedy requests must equal unbatched ``generate`` token for
token, and each request brings its own temperature and top-p.

The design: a running batch of left-padded sequences in one :class:`DynamicCache`. Between
two decoding steps the scheduler retires finished or cancelled requests (rows dropped from
the cache) and admits waiting ones: those waiting are prefilled together (left-padded, as
batched ``generate`` would) and their cache is merged into the batch, the shorter side
padded on the left with zero keys and values that the attention mask hides. Each step is
one forward pass over every running sequence, so an edit (published to the patch hooks as
one immutable state) takes effect for all of them at the same step. Position ids are kept
per row, so padding never shifts them.

Only decoder-only models whose cache layers are plain full-attention layers are merged;
others (sliding windows) run with a batch of one, which needs no padding.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

logger = logging.getLogger("tpatcher.server")

#: Temperatures below this cannot be sampled meaningfully (logits / T overflows): greedy.
MIN_TEMPERATURE = 1e-5


@dataclass(eq=False)  # compared by identity
class Job:
    """One request in the scheduler: its prompt, settings, and where its tokens go.

    ``emit`` is called on the scheduler thread with each new token id, then once with
    ``None`` when the request ends; ``done`` then holds the :class:`Outcome`."""

    input_ids: torch.Tensor
    max_new: int
    temperature: float = 0.0
    top_p: float = 1.0
    stops: tuple[str, ...] = ()
    emit: Callable[[int | None], None] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: Future[Outcome] = field(default_factory=Future)
    new_ids: list[int] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def abandoned(self) -> bool:
        """Its consumer cancelled it (a client that went away): stop spending steps on it."""
        return self.cancel.is_set() or self.done.cancelled()


@dataclass
class Outcome:
    """How a job ended: its new token ids and whether a stop string or cancel ended it."""

    new_ids: list[int]
    stopped: bool
    cancelled: bool


def sample_next(logits: torch.Tensor, jobs: list[Job]) -> list[int]:
    """The next token of each row: argmax for greedy jobs, else temperature then top-p
    sampling as ``generate``'s warpers do it."""
    picks = logits.argmax(dim=-1).tolist()
    for i, job in enumerate(jobs):
        if job.greedy:
            continue
        scores = logits[i].float() / job.temperature
        if job.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cum = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cum <= 1 - job.top_p
            drop[-1] = False  # keep at least one token
            scores = scores.scatter(0, order, ordered.masked_fill(drop, -float("inf")))
        picks[i] = int(torch.multinomial(F.softmax(scores, dim=-1), 1))
    return picks


class Batch:
    """The running batch: one cache, its attention mask, and per-row positions and jobs."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)
        self.pos = torch.zeros(0, dtype=torch.long)
        self.last = torch.zeros(0, 1, dtype=torch.long)
        self.jobs: list[Job] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def add(
        self, jobs: list[Job], cache: DynamicCache, mask: torch.Tensor, tokens: list[int]
    ) -> None:
        """Append prefilled jobs: their left-padded cache and mask, and first new tokens."""
        pos = mask.sum(dim=1)  # the next token's position: the real tokens before it
        last = torch.tensor(tokens, device=mask.device)[:, None]
        if not self.jobs or self.cache is None:
            self.cache, self.mask, self.pos, self.last = cache, mask, pos, last
            self.jobs = list(jobs)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        grow, pad = width - self.mask.shape[1], width - mask.shape[1]
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, grow), _left_pad(theirs.keys, pad)])
            mine.values = torch.cat([_left_pad(mine.values, grow), _left_pad(theirs.values, pad)])
        self.mask = torch.cat([F.pad(self.mask, (grow, 0)), F.pad(mask, (pad, 0))])
        self.pos = torch.cat([self.pos, pos])
        self.last = torch.cat([self.last, last])
        self.jobs.extend(jobs)

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``; drop the leading columns that are padding in every row left."""
        if len(rows) == len(self.jobs):
            return
        self.jobs = [self.jobs[i] for i in rows]
        if not rows:
            self.cache = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[index]
        start = int((mask.sum(dim=0) > 0).long().argmax())  # first column some row uses
        assert self.cache is not None
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask, self.pos, self.last = mask[:, start:], self.pos[index], self.last[index]


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` ([batch, heads, seq, dim]) with ``n`` zero positions before its sequence."""
    return F.pad(t, (0, 0, n, 0)) if n else t


class Scheduler:
    """A thread that decodes every running job one step per forward pass, admitting new jobs
    and retiring finished ones between steps (at most ``max_batch`` run at once)."""

    def __init__(self, model: Any, tokenizer: Any, eos_ids: set[int], max_batch: int = 8) -> None:
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, eos_ids
        self.max_batch = max(1, max_batch)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # a job is queued before the last drain, or refused
        self._batch = Batch()
        layers = DynamicCache(config=model.config).layers
        #: Whether caches can be padded and merged (plain full-attention layers only).
        self._mergeable = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        params = inspect.signature(model.forward).parameters
        self._keep_kw = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in 5.x
        #: Decoding steps run (one forward pass each, over the whole batch).
        self.steps = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tpatcher-batch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel everything still running or waiting, and end the thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self._queue.put(None)  # wakes a scheduler waiting for work
        self._thread.join()
        self._thread = None

    def submit(self, job: Job) -> Future[Outcome]:
        with self._lock:
            if self._thread is None or self._stopping.is_set():
                raise RuntimeError("the scheduler is not running")
            self._queue.put(job)
        return job.done

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._admit(block=not self._batch)
            if self._batch and not self._stopping.is_set():
                try:
                    with torch.no_grad():
                        self._step()
                except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                    logger.exception("a batched decoding step failed")
                    self._fail_all(exc)
        self._fail_all(RuntimeError("the generator stopped"))
        with self._lock:
            while not self._queue.empty():
                if (job := self._queue.get_nowait()) is not None:
                    self._fail(job, RuntimeError("the generator stopped"))

    def _admit(self, block: bool) -> None:
        """Prefill the waiting jobs there is room for, together, and merge them into the
        batch (waiting for one if ``block`` and none runs)."""
        group: list[Job] = []
        while len(self._batch) + len(group) < self._limit() and not self._stopping.is_set():
            try:
                job = self._queue.get(block=block and not self._batch and not group)
            except queue.Empty:
                break
            if job is None:
                break
            if job.abandoned:
                self._finish(job, cancelled=True)
            else:
                group.append(job)
        if not group:
            return
        try:
            with torch.no_grad():
                self._prefill(group)
        except Exception as exc:  # noqa: BLE001 - these jobs fail, the running ones go on
            logger.exception("prefill failed")
            for job in group:
                self._fail(job, exc)
            self._batch.keep([i for i, j in enumerate(self._batch.jobs) if j not in group])

    def _limit(self) -> int:
        return self.max_batch if self._mergeable else 1

    def _prefill(self, group: list[Job]) -> None:
        """Run the prompts of ``group`` (left-padded), take their first tokens, and merge
        them into the batch."""
        width = max(job.input_ids.shape[1] for job in group)
        ids = torch.cat([F.pad(j.input_ids, (width - j.input_ids.shape[1], 0)) for j in group])
        mask = torch.cat(
            [F.pad(torch.ones_like(j.input_ids), (width - j.input_ids.shape[1], 0)) for j in group]
        )
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0),
            use_cache=True,
            **{self._cache_kw: cache},
            **self._keep_kw,
        )
        tokens = sample_next(out.logits[:, -1, :], group)
        start = len(self._batch)
        self._batch.add(group, cache, mask, tokens)
        ended = {start + i for i, job in enumerate(group) if self._record(job, tokens[i])}
        self._batch.keep([i for i in range(len(self._batch)) if i not in ended])

    def _step(self) -> None:
        """One forward pass over every running job, then their next tokens."""
        b = self._batch
        finished = [i for i, job in enumerate(b.jobs) if job.abandoned]
        for i in finished:
            self._finish(b.jobs[i], cancelled=True)
        b.keep([i for i in range(len(b)) if i not in finished])
        if not b:
            return
        mask = torch.cat([b.mask, b.mask.new_ones(len(b), 1)], dim=1)
        out = self.model(
            input_ids=b.last,
            attention_mask=mask,
            position_ids=b.pos[:, None],
            use_cache=True,
            **{self._cache_kw: b.cache},
        )
        self.steps += 1
        b.mask, b.pos = mask, b.pos + 1
        tokens = sample_next(out.logits[:, -1, :], b.jobs)
        b.last = b.last.new_tensor(tokens)[:, None]
        ended = {i for i, job in enumerate(b.jobs) if self._record(job, tokens[i])}
        b.keep([i for i in range(len(b)) if i not in ended])

    # -- per job ---------------------------------------------------------------------------
    def _record(self, job: Job, token: int) -> bool:
        """Give ``job`` its new token; True (and the job finished) when it is done."""
        job.new_ids.append(token)
        if job.emit is not None:
            job.emit(token)
        stopped = False
        if job.stops:
            text = self.tokenizer.decode(job.new_ids, skip_special_tokens=True)
            stopped = any(s in text for s in job.stops)
        if stopped or token in self.eos_ids or len(job.new_ids) >= job.max_new:
            self._finish(job, stopped=stopped)
            return True
        return False

    def _finish(self, job: Job, *, stopped: bool = False, cancelled: bool = False) -> None:
        if job.emit is not None:
            job.emit(None)
        with contextlib.suppress(InvalidStateError):  # its waiter may have cancelled it
            job.done.set_result(Outcome(list(job.new_ids), stopped, cancelled))

    def _fail(self, job: Job, exc: BaseException) -> None:
        if job.emit is not None:
            job.emit(None)
        with contextlib.suppress(InvalidStateError):
            job.done.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for job in self._batch.jobs:
            self._fail(job, exc)
        self._batch = Batch()
