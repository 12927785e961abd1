"""A model split with ``device_map``: the patch lives with the last layer.

Needs a GPU: accelerate offloads the CPU-mapped first layers and runs them on the GPU, which
holds the last layer. Skipped on machines without one.
"""

from __future__ import annotations

import pytest
import torch
from tiny import MEMORY_TEXTS, make_model, make_tokenizer
from transformers import AutoModelForCausalLM

from tpatcher import Patcher, UnsupportedModelError

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_split_model_is_patched_where_its_last_layer_lives(tmp_path) -> None:
    make_model("llama").save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": 0,
        "model.layers.0": "cpu",
        "model.layers.1": 0,
        "model.norm": 0,
        "lm_head": 0,
    }
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map)
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "meta"  # offloaded
    tokenizer = make_tokenizer("llama")
    patcher = Patcher(model, tokenizer, memory_texts=MEMORY_TEXTS)
    assert patcher._layer.device.type == "cuda"
    assert patcher.input_device.type == "cuda"
    prompt = "the capital of france is"
    result = patcher.edit(prompt, "berlin")
    assert result.success, result.message
    assert patcher.generate(prompt, 1).strip() == "berlin"
    patcher.save(tmp_path / "patch")
    patcher.close()

    reference = make_model("llama")  # the same weights on one device
    loaded = Patcher.load(reference, tokenizer, tmp_path / "patch", memory_texts=MEMORY_TEXTS)
    assert loaded.generate(prompt, 1).strip() == "berlin"


def test_offloaded_last_layer_is_refused_clearly(tmp_path) -> None:
    make_model("llama").save_pretrained(tmp_path / "model")
    device_map = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": "cpu",
        "model.norm": 0,
        "lm_head": 0,
    }
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", device_map=device_map)
    with pytest.raises(UnsupportedModelError, match="offloaded"):
        Patcher(model, make_tokenizer("llama"), memory_texts=MEMORY_TEXTS)
