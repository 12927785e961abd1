"""Continuous batching (:mod:`tpatcher.server.batching`): batched greedy decoding equals
unbatched ``generate`` token for token, requests share forward passes, per-request sampling,
stop strings, cancellation, and an edit lands for the whole batch at one step."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from tiny import MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import Patcher
from tpatcher.server.batching import Job, Scheduler, sample_next
from tpatcher.server.generation import Generator, Sampling, StreamResult

PROMPTS = [
    "the capital of france is",
    "who wrote",
    "red blue green cat dog bird fish tree house car book music film song apple water",
    "one two",
    "the sun is a star and the moon",
    "what",
]


def reference(model: Any, ids: torch.Tensor, max_new: int, eos: int | None) -> list[int]:
    """Unbatched greedy ``generate``."""
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=eos,
            eos_token_id=eos,
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.fixture
def tiny() -> tuple[Any, Any]:
    return make_model("llama").eval(), make_tokenizer("llama")


@pytest.fixture
def scheduler(tiny: tuple[Any, Any]) -> Iterator[Scheduler]:
    model, tok = tiny
    s = Scheduler(model, tok, {tok.eos_token_id}, max_batch=4)
    s.start()
    yield s
    s.stop()


def encode(tok: Any, prompt: str) -> torch.Tensor:
    return tok(prompt, return_tensors="pt")["input_ids"]


def test_batched_greedy_equals_generate_token_for_token(
    tiny: tuple[Any, Any], scheduler: Scheduler
) -> None:
    """Staggered arrivals of prompts of different lengths (padding grows on either side),
    more requests than rows (some wait), and rows retired at different steps."""
    model, tok = tiny
    jobs = []
    for i, prompt in enumerate(PROMPTS):
        jobs.append(Job(encode(tok, prompt), max_new=12 + 7 * i))
        scheduler.submit(jobs[-1])
        time.sleep(0.005 * (i % 3))
    total = 0
    for job in jobs:
        outcome = job.done.result(timeout=60)
        ref = reference(model, job.input_ids, job.max_new, tok.eos_token_id)
        assert outcome.new_ids == ref
        total += len(ref)
    assert scheduler.steps < total  # forward passes were shared


def test_greedy_rows_are_unaffected_by_sampled_rows(
    tiny: tuple[Any, Any], scheduler: Scheduler
) -> None:
    model, tok = tiny
    torch.manual_seed(0)
    greedy = [Job(encode(tok, p), max_new=20) for p in PROMPTS[:2]]
    sampled = [Job(encode(tok, p), 20, temperature=1.5, top_p=0.9) for p in PROMPTS[2:4]]
    for job in [*sampled, *greedy]:
        scheduler.submit(job)
    for job in greedy:
        ref = reference(model, job.input_ids, 20, tok.eos_token_id)
        assert job.done.result(timeout=60).new_ids == ref
    for job in sampled:
        assert 1 <= len(job.done.result(timeout=60).new_ids) <= 20


def test_sample_next_top_p_keeps_the_nucleus() -> None:
    logits = torch.tensor([[0.0, 10.0, 9.0, -5.0], [1.0, 2.0, 3.0, 4.0]])
    jobs = [Job(torch.zeros(1, 1), 1, temperature=1.0, top_p=0.5), Job(torch.zeros(1, 1), 1)]
    torch.manual_seed(0)
    picks = {tuple(sample_next(logits, jobs)) for _ in range(50)}
    assert picks == {(1, 3)}  # only the top token is in a 0.5 nucleus; row 2 is greedy


def test_stop_strings_cancel_and_streaming(tiny: tuple[Any, Any], scheduler: Scheduler) -> None:
    model, tok = tiny
    ids = encode(tok, PROMPTS[0])
    full = reference(model, ids, 30, tok.eos_token_id)
    words = tok.decode(full, skip_special_tokens=True).split()
    assert len(words) > 3
    stop = Job(ids, 30, stops=(words[2],))
    emitted: list[int | None] = []
    streamed = Job(ids, 30, emit=emitted.append)
    cancelled = Job(ids, 100)
    for job in (stop, streamed, cancelled):
        scheduler.submit(job)
    cancelled.cancel.set()
    out = stop.done.result(timeout=60)
    assert out.stopped and out.new_ids == full[: len(out.new_ids)] and len(out.new_ids) < 30
    assert streamed.done.result(timeout=60).new_ids == full
    assert emitted == [*full, None]  # every token as it came, then the end
    out = cancelled.done.result(timeout=60)
    assert out.cancelled and len(out.new_ids) < 100


def patched(model: Any, tok: Any) -> Patcher:
    return Patcher(model, tok, memory_texts=MEMORY_TEXTS)


def test_generator_complete_and_stream_in_parallel(tiny: tuple[Any, Any]) -> None:
    """The service's interface: concurrent completions and streams, usage counts."""
    model, tok = tiny
    gen = Generator(patched(model, tok), workers=1, max_batch=8)
    gen.start()

    async def main() -> tuple[list[Any], list[tuple[str, StreamResult]]]:
        async def stream(prompt: str) -> tuple[str, StreamResult]:
            result = StreamResult()
            text = "".join([p async for p in gen.stream(prompt, Sampling(16), result)])
            return text, result

        completes = [gen.complete(p, Sampling(16)) for p in PROMPTS[:3]]
        streams = [stream(p) for p in PROMPTS[:3]]
        done = await asyncio.gather(*completes, *streams)
        return list(done[:3]), list(done[3:])

    try:
        completions, streams = asyncio.run(main())
        for prompt, c, (text, result) in zip(PROMPTS, completions, streams, strict=False):
            ids = encode(tok, prompt)
            ref = reference(model, ids, 16, tok.eos_token_id)
            assert c.text == text == tok.decode(ref, skip_special_tokens=True)
            assert c.completion_tokens == result.completion_tokens == len(ref)
            assert c.prompt_tokens == result.prompt_tokens == ids.shape[1]
            assert c.finish_reason == result.finish_reason
        assert gen.scheduler is not None and gen.scheduler.steps < 3 * 2 * 16
    finally:
        gen.stop()


def test_an_edit_lands_for_the_whole_batch_at_one_step(tiny: tuple[Any, Any]) -> None:
    """Roll an edit back while a batch decodes: each batched forward pass reads one state for
    all its rows (one call of the neuron output per pass), old state first, then new."""
    model, tok = tiny
    patcher = patched(model, tok)
    first = patcher.edit("the capital of france is", "berlin")
    second = patcher.edit("the capital of italy is", "tokyo")
    assert first.success and second.success and first.edit_id and second.edit_id
    layer = patcher._layer
    seen: list[tuple[int, int]] = []  # (batch rows, state id) per read on the batch thread
    passes: list[int] = []
    original = layer.committed_output

    def spy(q: torch.Tensor, state: Any = None) -> torch.Tensor:
        if threading.current_thread().name == "tpatcher-batch":
            seen.append((q.shape[0], id(state)))
        return original(q, state)

    def count(module: Any, args: Any, kwargs: Any) -> None:
        if threading.current_thread().name == "tpatcher-batch":
            passes.append(kwargs["input_ids"].shape[0])

    layer.committed_output = spy  # type: ignore[method-assign]
    handle = model.register_forward_pre_hook(count, with_kwargs=True)
    scheduler = Scheduler(model, tok, set(), max_batch=4)  # no eos: every job runs its length
    scheduler.start()
    try:
        jobs = [Job(encode(tok, p), max_new=80) for p in PROMPTS[:4]]
        for job in jobs:
            scheduler.submit(job)
        while scheduler.steps < 20:
            time.sleep(0.001)
        patcher.rollback(first.edit_id)
        for job in jobs:
            assert len(job.done.result(timeout=60).new_ids) == 80
    finally:
        scheduler.stop()
        handle.remove()
    assert [rows for rows, _ in seen] == passes  # one state read per pass, for all its rows
    states = [state for _, state in seen]
    switch = [i for i in range(1, len(states)) if states[i] != states[i - 1]]
    assert len(switch) == 1  # old state for whole passes, then the new one for whole passes
    assert max(passes[switch[0] - 1 : switch[0] + 1]) > 1  # it landed mid-batch


def test_smollm2_batched_greedy_equals_generate() -> None:
    """The real model (bf16/fp32 numerics of a trained model, its own eos)."""
    from tpatcher import load_model

    try:
        model, tok = load_model("smollm2-135m")
    except Exception as exc:  # noqa: BLE001 - not available offline here
        pytest.skip(f"SmolLM2 not available: {exc}")
    model.eval()
    eos = model.generation_config.eos_token_id
    s = Scheduler(model, tok, {eos}, max_batch=4)
    s.start()
    prompts = [
        "The capital of France is",
        "Here is a short poem about the sea:\n",
        "def fibonacci(n):",
        "My favourite book is",
    ]
    try:
        jobs = [Job(encode(tok, p), max_new=24) for p in prompts]
        for job in jobs:
            s.submit(job)
        for job in jobs:
            assert job.done.result(timeout=300).new_ids == reference(model, job.input_ids, 24, eos)
    finally:
        s.stop()


def test_a_request_whose_client_left_is_retired(tiny: tuple[Any, Any]) -> None:
    """Cancelling the awaiting task (a disconnect) frees the row at the next step."""
    model, tok = tiny
    gen = Generator(patched(model, tok), workers=1, max_batch=4)
    gen.eos_ids = set()  # run to max_tokens unless retired
    gen.start()
    scheduler = gen.scheduler
    assert scheduler is not None

    async def main() -> int:
        task = asyncio.create_task(gen.complete(PROMPTS[0], Sampling(100)))
        deadline = time.monotonic() + 30
        while scheduler.steps < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)
        return scheduler.steps

    try:
        steps = asyncio.run(main())
        time.sleep(0.2)
        assert scheduler.steps == steps < 99  # nothing decodes any more
    finally:
        gen.stop()


def test_stopping_fails_running_and_refuses_new_jobs(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    s = Scheduler(model, tok, set(), max_batch=2)
    s.start()
    job = Job(encode(tok, PROMPTS[0]), max_new=100)
    s.submit(job)
    s.stop()
    assert job.done.exception(timeout=10) is not None or job.done.result().new_ids
    with pytest.raises(RuntimeError):
        s.submit(Job(encode(tok, PROMPTS[1]), max_new=1))


def test_sliding_window_caches_run_one_at_a_time_and_still_match() -> None:
    model, tok = make_model("gemma3").eval(), make_tokenizer("gemma3")
    s = Scheduler(model, tok, {tok.eos_token_id}, max_batch=4)
    assert not s._mergeable  # its sliding layers cannot be padded and merged
    s.start()
    try:
        jobs = [Job(encode(tok, p), max_new=10) for p in PROMPTS[:3]]
        for job in jobs:
            s.submit(job)
        for job in jobs:
            ref = reference(model, job.input_ids, 10, tok.eos_token_id)
            assert job.done.result(timeout=60).new_ids == ref
    finally:
        s.stop()


def test_a_failing_prefill_fails_its_job_only(tiny: tuple[Any, Any], scheduler: Scheduler) -> None:
    model, tok = tiny
    good = Job(encode(tok, PROMPTS[0]), max_new=40)
    scheduler.submit(good)
    deadline = time.monotonic() + 30
    while scheduler.steps < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    bad = Job(torch.tensor([[10_000]]), max_new=5)  # out of the vocabulary
    scheduler.submit(bad)
    assert bad.done.exception(timeout=60) is not None
    ref = reference(model, good.input_ids, 40, tok.eos_token_id)
    assert good.done.result(timeout=60).new_ids == ref
