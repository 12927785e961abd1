"""Inference and edit tokens, in process, on a tiny model (fast)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from tiny import MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import Patcher
from tpatcher.server import EditStore, create_app


def make_client(tmp_path, **tokens) -> tuple[TestClient, Patcher, EditStore]:
    patcher = Patcher(make_model("llama"), make_tokenizer("llama"), memory_texts=MEMORY_TEXTS)
    store = EditStore(tmp_path / "store")
    store.open(patcher, store.check())
    return TestClient(create_app(patcher, store, model_name="tiny", **tokens)), patcher, store


def test_api_token_guards_inference(tmp_path) -> None:
    client, _, _ = make_client(tmp_path, api_token="reader", edit_token="writer")
    body = {"model": "tiny", "prompt": "the capital of france is", "max_tokens": 2}
    with client:
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v1/completions", json=body).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert client.post("/v1/completions", json=body, headers=wrong).status_code == 401
        right = {"authorization": "Bearer reader"}
        response = client.post("/v1/completions", json=body, headers=right)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"]
        assert client.get("/healthz").status_code == 200


def test_edit_token_is_separate_from_the_api_token(tmp_path) -> None:
    client, patcher, store = make_client(tmp_path, api_token="reader", edit_token="writer")
    edit = {"prompt": "the capital of france is", "target": "berlin"}
    with client:
        response = client.post("/v1/edits", json=edit, headers={"authorization": "Bearer reader"})
        assert response.status_code == 401 and patcher.num_neurons == 0
        response = client.post("/v1/edits", json=edit, headers={"authorization": "Bearer writer"})
        assert response.status_code == 201, response.text
        edit_id = (
            response.json()["edit_id"] if "edit_id" in response.json() else response.json()["id"]
        )
        assert patcher.num_neurons >= 1
        assert store.sha256(edit_id)
