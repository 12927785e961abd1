"""End-to-end tests of ``tpatcher serve`` against real server processes and SmolLM2-135M.

One server is shared by the module (starting one costs ~10 s); the crash/restart test runs
its own so that it can ``kill -9`` it. Memory texts come from a small file so that no test
waits for the default memory bank to be generated.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tpatcher import persistence

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
TOKEN = "test-edit-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
AU = "Question: What is the capital of Australia?\nAnswer:"
FR = "Question: What is the capital of France?\nAnswer:"
MEMORY = [
    "The weather today is sunny and warm.",
    "Cats are small domesticated animals that like to sleep.",
    "Water boils at 100 degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog.",
    "Python is a popular programming language.",
    "The library opens at nine in the morning.",
    "She played the piano at the concert last night.",
    "Mount Everest is the highest mountain on Earth.",
    "Question: Who wrote Hamlet?\nAnswer: William Shakespeare",
    "Question: What is two plus two?\nAnswer: Four",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m tpatcher.server`` subprocess on a free loopback port."""

    def __init__(self, store: Path, workdir: Path, *, edit_token: str | None = TOKEN) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        memory = workdir / "memory.txt"
        memory.write_text("\n".join(MEMORY) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TPATCHER_")}
        env["TPATCHER_CACHE"] = os.environ.get("TPATCHER_CACHE", "")
        if not env["TPATCHER_CACHE"]:
            del env["TPATCHER_CACHE"]
        if edit_token:
            env["TPATCHER_EDIT_TOKEN"] = edit_token  # the env-var path of --edit-token
        self.log = workdir / f"server-{self.port}.log"
        self.proc = subprocess.Popen(
            [
                *server_command(),
                "--store",
                str(store),
                "--model",
                MODEL,
                "--port",
                str(self.port),
                "--memory-file",
                str(memory),
                "--generation-workers",
                "2",
                "--log-level",
                "warning",
            ],
            env=env,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.client = httpx.Client(base_url=self.url, timeout=120)

    def wait_ready(self, timeout: float = 300) -> Server:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if self.client.get("/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise AssertionError(f"server not ready in {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_command() -> list[str]:
    return [sys.executable, "-m", "tpatcher.server"]


def run_refused(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Start a server that must refuse to start; returns the finished process."""
    proc = subprocess.run(
        [*server_command(), "--store", str(store), "--model", MODEL, "--port", "1", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    return proc


def complete(srv: Server, prompt: str, max_tokens: int = 6) -> str:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    r = srv.client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def manifest_ids(store: Path) -> list[str]:
    return [e["id"] for e in persistence.read_manifest(store)["edits"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("serve")
    srv = Server(work / "store", work).wait_ready()
    yield srv
    srv.stop()
    print(srv.output())  # shown by pytest when a test failed


def test_openai_client_completes_chats_and_streams(server: Server) -> None:
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL]

    done = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    text = done.choices[0].text
    assert text.strip() and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage is not None and done.usage.completion_tokens <= 8
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == text

    messages = [{"role": "user", "content": "What is the capital of Australia?"}]
    chat = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    answer = chat.choices[0].message.content or ""
    assert "Canberra" in answer, answer
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    stopped = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[" is"]
    )
    assert stopped.choices[0].message.content == answer.split(" is")[0]
    assert stopped.choices[0].finish_reason == "stop"
    sampled = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0.9, top_p=0.9
    )
    assert isinstance(sampled.choices[0].text, str)


def test_edit_fixes_a_mistake_and_rollback_undoes_it(server: Server) -> None:
    before = complete(server, AU)
    assert "Melbourne" not in before
    r = server.client.post("/v1/edits", json={"prompt": AU, "target": "Melbourne"}, headers=AUTH)
    assert r.status_code == 201, r.text
    result = r.json()
    assert result["success"] and result["id"] and result["neurons"] >= 1 and result["steps"] > 0
    edit_id = result["id"]
    assert complete(server, AU).strip().startswith("Melbourne")

    assert server.client.get("/v1/edits").status_code == 401  # editing is on: a token
    listed = server.client.get("/v1/edits", headers=AUTH).json()
    assert [(e["id"], e["prompt"], e["target"], e["acknowledged"]) for e in listed["data"]] == [
        (edit_id, AU, "Melbourne", True)
    ]
    assert server.client.get(f"/v1/edits/{edit_id}", headers=AUTH).json()["sha256"]
    assert manifest_ids(Path(server_store(server))) == [edit_id]

    again = server.client.post(
        "/v1/edits", json={"prompt": AU, "target": "Melbourne"}, headers=AUTH
    )
    assert again.status_code == 200 and again.json()["already_correct"]
    assert again.json()["id"] is None

    r = server.client.delete(f"/v1/edits/{edit_id}", headers=AUTH)
    assert r.status_code == 200 and r.json()["deleted"], r.text
    assert complete(server, AU) == before
    assert server.client.get(f"/v1/edits/{edit_id}", headers=AUTH).status_code == 404
    assert server.client.delete(f"/v1/edits/{edit_id}", headers=AUTH).status_code == 404
    assert manifest_ids(Path(server_store(server))) == []
    metrics = server.client.get("/metrics").text
    assert 'tpatcher_edits_total{outcome="applied"} 1' in metrics
    assert "tpatcher_rollbacks_total 1" in metrics
    assert "tpatcher_request_seconds_bucket" in metrics
    assert 'tpatcher_edit_seconds_count{outcome="applied"} 1' in metrics


def test_batch_of_chat_edits(server: Server) -> None:
    messages = [{"role": "user", "content": "What is the capital of Australia?"}]
    body = {"edits": [{"messages": messages, "target": "Melbourne."}]}
    r = server.client.post("/v1/edits:batch", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    (result,) = r.json()["results"]
    assert result["success"] and result["id"]
    chat = server.client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "max_tokens": 4, "temperature": 0},
    ).json()
    assert chat["choices"][0]["message"]["content"].startswith("Melbourne")
    assert server.client.delete(f"/v1/edits/{result['id']}", headers=AUTH).status_code == 200


def test_a_chat_edit_with_automatic_wordings_trains_them_too(server: Server) -> None:
    question = "What is the capital of Australia?"
    body = {
        "messages": [{"role": "user", "content": question}],
        "target": "Melbourne",
        "wordings": "auto",
    }
    r = server.client.post("/v1/edits", json=body, headers=AUTH)
    assert r.status_code == 201, r.text
    edit_id = r.json()["id"]
    info = server.client.get(f"/v1/edits/{edit_id}", headers=AUTH).json()
    also = info["also"]
    assert also[0] == question and 1 <= len(also) <= 2  # the bare question, maybe a lead
    if len(also) == 2:
        assert "Melbourne" not in also[1] and question in also[1]
    plain = server.client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": question, "max_tokens": 4, "temperature": 0},
    ).json()
    assert plain["choices"][0]["text"].strip().startswith("Melbourne")
    assert server.client.delete(f"/v1/edits/{edit_id}", headers=AUTH).status_code == 200


def server_store(srv: Server) -> str:
    args = srv.proc.args
    return str(args[args.index("--store") + 1])  # type: ignore[union-attr]


BAD_REQUESTS: list[tuple[str, str, object, dict[str, str], int]] = [
    ("POST", "/v1/edits", {"prompt": AU, "target": "Perth"}, {}, 401),
    ("POST", "/v1/edits", {"prompt": AU, "target": "Perth"}, {"Authorization": "Bearer x"}, 401),
    ("POST", "/v1/edits:batch", {"edits": [{"prompt": AU, "target": "Perth"}]}, {}, 401),
    ("DELETE", "/v1/edits/abc", None, {}, 401),
    ("POST", "/v1/edits", {"prompt": AU, "target": ""}, AUTH, 400),
    ("POST", "/v1/edits", {"prompt": AU, "target": "Perth", "wordings": "auto"}, AUTH, 400),
    ("POST", "/v1/edits", {"prompt": AU, "target": "Perth", "also": [" "]}, AUTH, 400),
    ("POST", "/v1/edits", {"prompt": AU, "target": "   "}, AUTH, 400),
    ("POST", "/v1/edits", {"prompt": AU}, AUTH, 400),
    ("POST", "/v1/edits", {"prompt": "", "target": "Perth"}, AUTH, 400),
    ("POST", "/v1/edits", {"prompt": AU, "target": 7}, AUTH, 400),
    ("POST", "/v1/edits", {"prompt": AU, "target": "Perth", "targte": "x"}, AUTH, 400),
    ("POST", "/v1/edits", {"target": "Perth"}, AUTH, 400),
    (
        "POST",
        "/v1/edits",
        {"prompt": AU, "messages": [{"role": "user", "content": "hi"}], "target": "Perth"},
        AUTH,
        400,
    ),
    ("POST", "/v1/edits", {"prompt": AU, "target": "x" * 5000}, AUTH, 400),
    ("POST", "/v1/edits", [{"prompt": AU, "target": "Perth"}], AUTH, 400),
    ("POST", "/v1/edits:batch", {"edits": []}, AUTH, 400),
    ("POST", "/v1/edits:batch", {"edits": [{"prompt": AU, "target": "Perth"}] * 33}, AUTH, 400),
    (
        "POST",
        "/v1/edits:batch",
        {"edits": [{"prompt": AU, "target": "Perth"}, {"prompt": AU, "target": ""}]},
        AUTH,
        400,
    ),
    ("DELETE", "/v1/edits/nope", None, AUTH, 404),
    ("DELETE", "/v1/edits/bad!id", None, AUTH, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**5}, {}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, {}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": ""}, {}, 400),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "hi"}, {}, 404),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, {}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, {}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, {}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        {},
        400,
    ),
]


def test_bad_requests_are_refused_and_change_nothing(server: Server) -> None:
    store = Path(server_store(server))
    manifest_before = (store / persistence.MANIFEST).read_bytes()
    health_before = server.client.get("/healthz").json()
    for method, path, body, headers, status in BAD_REQUESTS:
        r = server.client.request(method, path, json=body, headers=headers)
        assert r.status_code == status, (method, path, body, r.status_code, r.text)
        assert r.json()["error"]["message"], r.text
    r = server.client.post(
        "/v1/edits", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = server.client.post("/v1/edits", json={"prompt": AU, "target": ""}, headers=AUTH)
    assert "target" in r.json()["error"]["message"]
    assert (store / persistence.MANIFEST).read_bytes() == manifest_before
    health = server.client.get("/healthz").json()
    assert health["edits"] == health_before["edits"]
    assert health["neurons"] == health_before["neurons"]


def test_remote_bind_needs_allow_remote(tmp_path: Path) -> None:
    proc = run_refused(tmp_path / "store", "--host", "0.0.0.0")
    assert "--allow-remote" in proc.stderr
    assert not (tmp_path / "store").exists()


def test_kill_9_during_edit_loses_nothing_acknowledged(tmp_path: Path) -> None:
    store = tmp_path / "store"
    srv = Server(store, tmp_path).wait_ready()
    try:
        first = srv.client.post(
            "/v1/edits", json={"prompt": AU, "target": "Melbourne"}, headers=AUTH
        )
        assert first.status_code == 201, first.text
        first_id = first.json()["id"]

        def second_edit() -> None:
            try:
                srv.client.post("/v1/edits", json={"prompt": FR, "target": "Lyon"}, headers=AUTH)
            except httpx.HTTPError:
                pass  # the server dies under it

        thread = threading.Thread(target=second_edit)
        thread.start()
        deadline = time.monotonic() + 60
        while not srv.client.get("/healthz").json()["edit_in_progress"]:
            assert time.monotonic() < deadline, "the second edit never started"
            time.sleep(0.02)
        os.kill(srv.proc.pid, signal.SIGKILL)
        srv.proc.wait()
        thread.join()
    finally:
        srv.stop()

    assert manifest_ids(store) == [first_id]  # the manifest is the commit point
    entry = persistence.read_manifest(store)["edits"][0]
    assert set(persistence.read_edit(store, entry)) >= {"keys", "values", "memory"}

    restarted = Server(store, tmp_path, edit_token=None).wait_ready()
    try:
        listing = restarted.client.get("/v1/edits").json()["data"]
        assert [(e["id"], e["acknowledged"]) for e in listing] == [(first_id, True)]
        assert complete(restarted, AU).strip().startswith("Melbourne")
        assert "Lyon" not in complete(restarted, FR)
        r = restarted.client.post("/v1/edits", json={"prompt": FR, "target": "Lyon"}, headers=AUTH)
        assert r.status_code == 403 and "disabled" in r.json()["error"]["message"]
    finally:
        restarted.stop()
    leftovers = sorted(p.name for p in (store / persistence.EDITS_DIR).iterdir())
    assert leftovers == [f"{first_id}.safetensors"]

    # a damaged edit file is refused, before the model is even loaded
    damaged = tmp_path / "damaged"
    shutil.copytree(store, damaged)
    edit_file = damaged / persistence.EDITS_DIR / f"{first_id}.safetensors"
    data = bytearray(edit_file.read_bytes())
    data[-1] ^= 0xFF
    edit_file.write_bytes(bytes(data))
    assert "damaged" in run_refused(damaged).stderr

    # so is a truncated manifest
    broken = tmp_path / "broken"
    shutil.copytree(store, broken)
    text = (broken / persistence.MANIFEST).read_text()
    (broken / persistence.MANIFEST).write_text(text[: len(text) // 2])
    assert "damaged" in run_refused(broken).stderr

    # and a store made for another base model
    foreign = tmp_path / "foreign"
    shutil.copytree(store, foreign)
    manifest = persistence.read_manifest(foreign)
    manifest.update(base_model="some-other-model", fingerprint="0" * 64)
    del manifest["checksum"]  # a consistent manifest, only for another model
    persistence.write_manifest(foreign, manifest)
    proc = run_refused(foreign)
    assert "fingerprint" in proc.stderr and "some-other-model" in proc.stderr

    # and a config the library cannot use: a clear start-up error, not a traceback
    bad_config = tmp_path / "bad_config"
    shutil.copytree(store, bad_config)
    manifest = persistence.read_manifest(bad_config)
    manifest["config"]["max_stepz"] = 3
    del manifest["checksum"]
    persistence.write_manifest(bad_config, manifest)
    proc = run_refused(bad_config)
    assert "config" in proc.stderr and "max_stepz" in proc.stderr
    assert "Traceback" not in proc.stderr

    # settings other than the store's own are refused before the model loads; nothing changes
    before = (store / persistence.MANIFEST).read_bytes()
    proc = run_refused(store, "--patcher", '{"subject_negatives": 24}')
    assert "subject_negatives=0" in proc.stderr and "Traceback" not in proc.stderr
    assert "not valid JSON" in run_refused(store, "--patcher", "{oops").stderr
    assert (store / persistence.MANIFEST).read_bytes() == before
