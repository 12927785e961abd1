"""The service in process, on a tiny model (fast): two-phase edits, limits, metrics, audit."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tiny import MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import Patcher, PatcherConfig, persistence
from tpatcher.errors import PatchDirectoryError
from tpatcher.server import EditStore, create_app
from tpatcher.server.edits import PendingCounter
from tpatcher.server.limits import Limits
from tpatcher.server.service import Service

EDIT = "writer"
READ = "reader"
WRITER = {"authorization": f"Bearer {EDIT}"}
READER = {"authorization": f"Bearer {READ}"}
PROMPT = "the capital of france is"
TARGET = "berlin"
PROMPT2 = "the capital of italy is"
TARGET2 = "tokyo"


def open_store(path: Path) -> tuple[Patcher, EditStore]:
    """A fresh tiny model (same weights each time) with the store's edits: a 'restart'."""
    store = EditStore(path)
    manifest = store.check()
    patcher = Patcher(
        make_model("llama"),
        make_tokenizer("llama"),
        store.config_from(manifest),
        memory_texts=MEMORY_TEXTS,
    )
    store.open(patcher, manifest)
    return patcher, store


class App:
    """A test client with its patcher, store and service."""

    def __init__(self, path: Path, limits: Limits | None = None, **tokens: Any) -> None:
        self.path = path
        self.patcher, self.store = open_store(path)
        tokens = tokens or {"edit_token": EDIT, "api_token": READ}
        self.app = create_app(self.patcher, self.store, model_name="tiny", limits=limits, **tokens)
        self.service: Service = self.app.state.service
        self.client = TestClient(self.app)

    def complete(self, prompt: str = PROMPT, **extra: Any) -> str:
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0, **extra}
        response = self.client.post("/v1/completions", json=body, headers=READER)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"].strip()

    def metric(self, line: str) -> bool:
        return line in self.client.get("/metrics").text.splitlines()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[App]:
    app = App(tmp_path / "store")
    with app.client:
        yield app


def listed(path: Path) -> list[str]:
    return [e["id"] for e in persistence.read_manifest(path)["edits"]]


def test_unwritable_store_edit_is_never_seen_and_absent_after_restart(
    served: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = served.complete()
    assert before != TARGET
    seen_here: list[str] = []
    seen_elsewhere: list[str] = []
    real_write = persistence.write_manifest

    def unwritable(directory: Path, manifest: dict[str, Any]) -> None:
        # at the write: the edit is trained and verified, but not published
        seen_here.extend(served.patcher.pending_edits)
        other = threading.Thread(
            target=lambda: seen_elsewhere.append(
                served.patcher.generate(PROMPT, max_new_tokens=1).strip()
            )
        )
        other.start()
        other.join()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persistence, "write_manifest", unwritable)
    stop = threading.Event()
    answers: list[str] = []

    def read_loop() -> None:
        while not stop.is_set():
            answers.append(served.complete())

    readers = [threading.Thread(target=read_loop) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        response = served.client.post(
            "/v1/edits", json={"prompt": PROMPT, "target": TARGET}, headers=WRITER
        )
    finally:
        stop.set()
        for t in readers:
            t.join()
    monkeypatch.setattr(persistence, "write_manifest", real_write)

    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert error["code"] == "store_write_failed" and "not applied" in error["message"]
    assert len(seen_here) == 1  # the edit was trained and verified...
    assert seen_elsewhere == [before]  # ...but no other thread saw it
    assert answers and TARGET not in answers
    assert served.complete() == before
    assert served.patcher.num_neurons == 0 and not served.patcher.pending_edits
    assert listed(served.path) == []
    assert list((served.path / persistence.EDITS_DIR).glob("*.safetensors")) == []
    assert served.metric('tpatcher_errors_total{kind="store"} 1')
    assert served.metric('tpatcher_edits_total{outcome="store_error"} 1')
    assert served.metric('tpatcher_requests_total{method="POST",path="/v1/edits",status="500"} 1')
    restarted, _ = open_store(served.path)
    assert restarted.edit_ids == [] and restarted.num_neurons == 0


def test_batch_failing_after_the_first_item_applies_nothing(
    served: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_edit = served.patcher.edit
    calls: list[str] = []

    def second_fails(prompt: str, target: str, **kwargs: Any) -> Any:
        calls.append(prompt)
        if len(calls) == 2:
            raise RuntimeError("boom in the second item")
        return real_edit(prompt, target, **kwargs)

    monkeypatch.setattr(served.patcher, "edit", second_fails)
    body = {"edits": [{"prompt": PROMPT, "target": TARGET}, {"prompt": PROMPT2, "target": TARGET2}]}
    with caplog.at_level(logging.INFO):
        response = served.client.post("/v1/edits:batch", json=body, headers=WRITER)
    assert response.status_code == 500, response.text
    assert "boom" in response.json()["error"]["message"]
    assert len(calls) == 2
    assert served.patcher.num_neurons == 0 and not served.patcher.pending_edits
    assert served.patcher.edit_ids == [] and listed(served.path) == []
    assert served.complete() != TARGET
    tracebacks = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(tracebacks) == 1  # logged once
    assert served.metric('tpatcher_errors_total{kind="unhandled"} 1')
    assert served.metric('tpatcher_edits_total{outcome="error"} 2')
    assert served.service.edits.pending.count == 0


def test_batch_is_written_with_one_manifest_write_and_published_together(
    served: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[list[str]] = []
    real_write = persistence.write_manifest

    def counted(directory: Path, manifest: dict[str, Any]) -> None:
        writes.append([e["id"] for e in manifest["edits"]])
        real_write(directory, manifest)

    monkeypatch.setattr(persistence, "write_manifest", counted)
    body = {"edits": [{"prompt": PROMPT, "target": TARGET}, {"prompt": PROMPT2, "target": TARGET2}]}
    response = served.client.post("/v1/edits:batch", json=body, headers=WRITER)
    assert response.status_code == 201, response.text
    ids = [r["id"] for r in response.json()["results"]]
    assert all(ids) and writes == [ids]
    assert listed(served.path) == ids == served.patcher.edit_ids
    assert served.complete(PROMPT) == TARGET and served.complete(PROMPT2) == TARGET2
    listing = served.client.get("/v1/edits", headers=WRITER).json()["data"]
    assert [(e["id"], e["acknowledged"]) for e in listing] == [(i, True) for i in ids]


def test_edit_past_its_deadline_is_504_and_never_applied(tmp_path: Path) -> None:
    app = App(tmp_path / "store", Limits(edit_timeout=0.0))
    with app.client:
        response = app.client.post(
            "/v1/edits", json={"prompt": PROMPT, "target": TARGET}, headers=WRITER
        )
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "edit_timeout"
        time.sleep(0.2)
        assert app.patcher.num_neurons == 0 and not app.patcher.pending_edits
        assert listed(app.path) == [] and app.complete() != TARGET
        assert app.metric('tpatcher_edits_total{outcome="timeout"} 1')
        assert app.service.edits.pending.count == 0


def test_unacknowledged_edit_is_listed_so_after_a_restart(
    served: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the process "dies" after the durable write, before the response went out
    monkeypatch.setattr(served.service.edits, "acknowledge", lambda ids: None)
    response = served.client.post(
        "/v1/edits", json={"prompt": PROMPT, "target": TARGET}, headers=WRITER
    )
    assert response.status_code == 201, response.text
    edit_id = response.json()["id"]
    info = served.client.get(f"/v1/edits/{edit_id}", headers=READER).json()
    assert info["acknowledged"] is False
    shutil.copytree(served.path, served.path.parent / "copy")
    restarted = App(served.path.parent / "copy")
    with restarted.client:
        listing = restarted.client.get("/v1/edits", headers=READER).json()["data"]
        assert [(e["id"], e["acknowledged"]) for e in listing] == [(edit_id, False)]
        assert restarted.complete() == TARGET  # durable, so it is served
        deleted = restarted.client.delete(f"/v1/edits/{edit_id}", headers=WRITER)
        assert deleted.status_code == 200, deleted.text
        assert json.loads((restarted.path / "journal.json").read_text())["unacknowledged"] == []


def test_pending_edits_counter_is_exact_across_threads(served: App) -> None:
    counter = PendingCounter(limit=10**9)

    def churn() -> None:
        for _ in range(20_000):
            assert counter.reserve(1)
            counter.release(1)

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.count == 0
    small = PendingCounter(limit=2)
    assert small.reserve(2) and not small.reserve(1)
    small.release(2)
    assert small.reserve(1)

    bodies = [{"prompt": PROMPT, "target": TARGET}, {"prompt": PROMPT2, "target": TARGET2}]
    results: list[int] = []
    posts = [
        threading.Thread(
            target=lambda b=b: results.append(
                served.client.post("/v1/edits", json=b, headers=WRITER).status_code
            )
        )
        for b in bodies
    ]
    for t in posts:
        t.start()
    for t in posts:
        t.join()
    assert sorted(results) == [201, 201]
    assert served.service.edits.pending.count == 0
    assert served.metric("tpatcher_edits_pending 0")


def test_limits_body_size_and_edit_prompt_length(tmp_path: Path) -> None:
    app = App(tmp_path / "store", Limits(max_body_bytes=2048, max_edit_tokens=8))
    with app.client:
        big = {"prompt": "the " * 1000, "target": TARGET}
        response = app.client.post("/v1/edits", json=big, headers=WRITER)
        assert response.status_code == 413 and response.json()["error"]["limit"] == 2048

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(100):
                yield b"the " * 10
            yield b'", "target": "berlin"}'

        response = app.client.post(
            "/v1/edits",
            content=chunks(),
            headers={**WRITER, "content-type": "application/json"},
        )
        assert response.status_code == 413, response.text
        long_prompt = {"prompt": "the capital of the old big new city of france is", "target": "x"}
        response = app.client.post("/v1/edits", json=long_prompt, headers=WRITER)
        assert response.status_code == 422, response.text
        assert response.json()["error"]["limit"] == 8 and "8 tokens" in response.text
        assert app.patcher.num_neurons == 0
        assert app.metric('tpatcher_requests_total{method="POST",path="unmatched",status="413"} 2')


def test_unhandled_errors_are_500_counted_and_logged_once(
    served: App, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any) -> Any:
        raise RuntimeError("generation exploded")

    monkeypatch.setattr(served.service.generator, "complete", broken)
    with caplog.at_level(logging.INFO):
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 1}
        response = served.client.post("/v1/completions", json=body, headers=READER)
    assert response.status_code == 500
    assert "generation exploded" in response.json()["error"]["message"]
    assert len([r for r in caplog.records if r.exc_info]) == 1
    assert served.metric(
        'tpatcher_requests_total{method="POST",path="/v1/completions",status="500"} 1'
    )


def test_reading_edits_needs_a_token_when_editing_is_on(tmp_path: Path) -> None:
    app = App(tmp_path / "store", edit_token=EDIT)
    with app.client:
        assert app.client.get("/v1/edits").status_code == 401
        assert app.client.get("/v1/edits", headers=WRITER).status_code == 200
        assert app.client.get("/v1/edits", headers=READER).status_code == 401
    both = App(tmp_path / "store2")
    with both.client:
        assert both.client.get("/v1/edits").status_code == 401
        assert both.client.get("/v1/edits", headers=READER).status_code == 200
        assert both.client.get("/v1/edits", headers=WRITER).status_code == 200
    reader_only = App(tmp_path / "store3", api_token=READ)
    with reader_only.client:
        assert reader_only.client.get("/v1/edits").status_code == 401
        assert reader_only.client.get("/v1/edits", headers=READER).status_code == 200


def test_audit_log_names_who_and_what(served: App, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tpatcher.audit"):
        served.client.post("/v1/edits", json={"prompt": PROMPT, "target": TARGET})
        response = served.client.post(
            "/v1/edits", json={"prompt": PROMPT, "target": TARGET}, headers=WRITER
        )
        served.client.delete(f"/v1/edits/{response.json()['id']}", headers=WRITER)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tpatcher.audit"]
    assert [(x["event"], x["who"]) for x in lines] == [
        ("refusal", "anonymous"),
        ("edit", "edit-token"),
        ("rollback", "edit-token"),
    ]
    assert lines[0]["status"] == 401
    assert lines[1]["outcome"] == "applied" and lines[1]["id"] == response.json()["id"]
    assert PROMPT not in json.dumps(lines) and len(lines[1]["prompt_sha256"]) == 64
    assert lines[2]["outcome"] == "removed"


def test_tiny_temperature_is_greedy_and_streams_report_usage(served: App) -> None:
    greedy = served.complete(max_tokens=3)
    assert served.complete(max_tokens=3, temperature=1e-6) == greedy
    body = {
        "model": "tiny",
        "prompt": PROMPT,
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with served.client.stream("POST", "/v1/completions", json=body, headers=READER) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 3
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-2])
    assert text.strip() == greedy


def test_compare_answers_with_and_without_the_patch(served: App) -> None:
    body = {"prompt": PROMPT, "max_tokens": 1}
    before = served.client.post("/v1/compare", json=body, headers=READER).json()
    assert before["patched"] == before["base"]
    served.client.post("/v1/edits", json={"prompt": PROMPT, "target": TARGET}, headers=WRITER)
    after = served.client.post("/v1/compare", json=body, headers=READER)
    assert after.status_code == 200, after.text
    assert after.json()["patched"].strip() == TARGET
    assert after.json()["base"] == before["base"] != after.json()["patched"]
    assert served.complete() == TARGET  # the base model was for that request's thread only
    assert served.client.post("/v1/compare", json=body).status_code == 401


def test_an_edit_names_its_subject_or_is_refused(served: App) -> None:
    """A subject the prompt does not name is a 400 before anything trains; a named one is
    kept with the edit and listed with it."""
    wrong = {"prompt": PROMPT, "target": TARGET, "subject": "italy"}
    response = served.client.post("/v1/edits", json=wrong, headers=WRITER)
    assert response.status_code == 400 and "'italy' does not appear" in response.text
    assert served.patcher.num_neurons == 0 and not listed(served.path)
    body = {"prompt": PROMPT, "target": TARGET, "subject": "france"}
    response = served.client.post("/v1/edits", json=body, headers=WRITER)
    assert response.status_code == 201, response.text
    info = served.client.get(f"/v1/edits/{response.json()['id']}", headers=READER).json()
    assert info["subject"] == "france" and served.complete() == TARGET


def test_without_a_subject_the_service_guesses_it_where_negatives_train(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``subject_negatives`` on, a correction naming no subject is trained about the
    name its last user message holds; with it off, nothing is guessed."""
    monkeypatch.setattr("tpatcher.subject_negatives.subject_names", lambda: ("germany",))
    monkeypatch.setattr(
        EditStore, "config_from", staticmethod(lambda m: PatcherConfig(subject_negatives=1))
    )
    prompt = "the capital of France is"
    app = App(tmp_path / "store")
    with app.client:
        response = app.client.post(
            "/v1/edits", json={"prompt": prompt, "target": TARGET}, headers=WRITER
        )
        assert response.status_code == 201, response.text
        info = app.client.get(f"/v1/edits/{response.json()['id']}", headers=READER).json()
        assert info["subject"] == "France" and app.complete(prompt) == TARGET
    app.patcher.close()
    monkeypatch.setattr(EditStore, "config_from", staticmethod(lambda m: PatcherConfig()))
    plain = App(tmp_path / "plain")
    with plain.client:
        response = plain.client.post(
            "/v1/edits", json={"prompt": prompt, "target": TARGET}, headers=WRITER
        )
        info = plain.client.get(f"/v1/edits/{response.json()['id']}", headers=READER).json()
        assert response.status_code == 201 and info.get("subject") is None
    plain.patcher.close()


def make_store(tmp_path: Path) -> tuple[Path, str]:
    """A store with one edit, written by the service's own path."""
    app = App(tmp_path / "store")
    with app.client:
        response = app.client.post(
            "/v1/edits", json={"prompt": PROMPT, "target": TARGET}, headers=WRITER
        )
    assert response.status_code == 201, response.text
    app.patcher.close()
    return app.path, response.json()["id"]


def _rewrite(path: Path, change: Any) -> None:
    manifest = json.loads((path / persistence.MANIFEST).read_text())
    change(manifest)
    persistence.write_manifest(path, {k: v for k, v in manifest.items() if k != "checksum"})


def test_store_check_refuses_damage_with_the_reason(tmp_path: Path) -> None:
    path, edit_id = make_store(tmp_path)
    (path / ".manifest.json.abc.tmp").write_text("partial")
    assert EditStore(path).check() is not None
    assert not (path / ".manifest.json.abc.tmp").exists()

    cases = {
        "checksum": lambda p: (p / persistence.MANIFEST).write_text(
            (p / persistence.MANIFEST).read_text().replace(TARGET, "paris")
        ),
        "twice": lambda p: _rewrite(p, lambda m: m["edits"].append(dict(m["edits"][0]))),
        "missing": lambda p: (p / "edits" / f"{edit_id}.safetensors").unlink(),
        "not listed": lambda p: shutil.copy(
            p / "edits" / f"{edit_id}.safetensors", p / "edits" / "stray.safetensors"
        ),
        "config": lambda p: _rewrite(p, lambda m: m["config"].update(lr=-1)),
    }
    for reason, damage in cases.items():
        broken = tmp_path / reason.replace(" ", "_")
        shutil.copytree(path, broken)
        damage(broken)
        with pytest.raises(PatchDirectoryError, match=reason):
            EditStore(broken).check()

    # an unlisted file the journal explains (an interrupted write) is removed, not refused
    crashed = tmp_path / "crashed"
    shutil.copytree(path, crashed)
    shutil.copy(
        crashed / "edits" / f"{edit_id}.safetensors", crashed / "edits" / "new1.safetensors"
    )
    (crashed / "journal.json").write_text(json.dumps({"unacknowledged": ["new1"]}))
    assert EditStore(crashed).check() is not None
    assert not (crashed / "edits" / "new1.safetensors").exists()


def test_help_works_without_fastapi() -> None:
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('fastapi', 'starlette', 'uvicorn'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from tpatcher.cli import app\n"
        "import tpatcher.server.command\n"
        "assert 'fastapi' not in sys.modules\n"
        "for args in (['--help'], ['serve', '--help']):\n"
        "    try:\n"
        "        app(args)\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocker],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, COLUMNS="200"),
    )
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout
    assert "--threads" in proc.stdout and "--edit-timeout" in proc.stdout


def test_a_new_store_takes_the_settings_it_is_given_and_an_old_one_keeps_its_own(
    tmp_path: Path,
) -> None:
    """``tpatcher serve --patcher``: a new store is made with the settings, and its edits
    train with them after a restart; an existing store refuses settings it was not made
    with, naming the field, and is left as it was."""
    store = EditStore(tmp_path / "store")
    config = store.settings(store.check(), {"subject_negatives": 2, "max_steps": 300})
    assert config == PatcherConfig(subject_negatives=2, max_steps=300)
    patcher = Patcher(
        make_model("llama"), make_tokenizer("llama"), config, memory_texts=MEMORY_TEXTS
    )
    store.open(patcher, None)
    again = EditStore(tmp_path / "store")
    manifest = again.check()
    kept = again.settings(manifest, {})  # "auto" is read back as what it gave
    assert kept == PatcherConfig(subject_negatives=2, max_steps=300, neuron_activation="relu")
    assert again.settings(manifest, {"subject_negatives": 2}) == kept
    before = (tmp_path / "store" / persistence.MANIFEST).read_bytes()
    with pytest.raises(PatchDirectoryError, match="max_steps=300, not 2000"):
        again.settings(manifest, {"max_steps": 2000})
    with pytest.raises(PatchDirectoryError, match="max_stepz"):
        again.settings(manifest, {"max_stepz": 3})
    with pytest.raises(PatchDirectoryError, match="subject_negatives must be >= 0"):
        EditStore(tmp_path / "new").settings(None, {"subject_negatives": -1})
    assert (tmp_path / "store" / persistence.MANIFEST).read_bytes() == before
