"""Merging patch neurons into the FFN and exporting the result for transformers and llama.cpp.

The tiny random models run every architecture's merge and the HF export; the real SmolLM2
(marked slow) checks both neuron forms, the HF export and, where llama-cpp-python is
installed, the GGUF export under llama.cpp.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import dequantize, quantize
from tiny import ARCHITECTURES, MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import PatchDirectoryError, Patcher, PatcherConfig, UnsupportedModelError
from tpatcher.export import ExportError, export_patch
from tpatcher.export_gguf import GGUFExportError, _check_zero_decodes_to_zero, write_gguf
from tpatcher.ffn_site import FFNSite
from tpatcher.layer import NeuronState, neuron_output
from tpatcher.merging import (
    fold_plan,
    merge_into,
    pad_ffn,
    relu_gap,
    round_up,
    widen_all_layers,
)
from tpatcher.models import AUTO_CLASSES

PROMPT = "the capital of france is"
OTHER = ["the weather today is good", "who wrote the famous novel", "the cat sleeps in the house"]


def edited_patcher(kind: str, model=None, **config) -> Patcher:
    model = model if model is not None else make_model(kind)
    patcher = Patcher(
        model, make_tokenizer(kind), PatcherConfig(**config), memory_texts=MEMORY_TEXTS
    )
    if patcher.task == "seq-cls":
        text = "the capital of france is paris"
        result = patcher.edit(text, (patcher.classify(text) + 1) % 3)
    else:
        result = patcher.edit(PROMPT, "berlin")
    assert result.success, result.message
    return patcher


def all_logits(model, tokenizer, task: str) -> dict[str, torch.Tensor]:
    out = {}
    for text in [PROMPT, *OTHER]:
        enc = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            if task == "seq2seq":
                dec = model.prepare_decoder_input_ids_from_labels(labels=enc["input_ids"])
                out[text] = model(**enc, decoder_input_ids=dec).logits
            else:
                out[text] = model(**enc).logits
    return out


def merged_in_place(patcher: Patcher, scale: float | None = None):
    """Close the patcher and fold its neurons into its (now plain) model."""
    state, activation = patcher.neurons, patcher.activation
    patcher.close()
    site = FFNSite(patcher.model, patcher.adapter, patcher.block_path)
    return merge_into(patcher.model, site, state, activation, scale=scale)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    for text in a:
        diff = float((a[text] - b[text]).abs().max())
        assert diff <= atol, (text, diff)


# -- merging -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ARCHITECTURES)
@pytest.mark.parametrize("form", ["ffn", "relu"])
def test_merged_logits_equal_patched(kind: str, form: str) -> None:
    patcher = edited_patcher(kind, neuron_activation=None if form == "ffn" else "relu")
    assert patcher.neurons.size >= 1
    patched = all_logits(patcher.model, patcher.tokenizer, patcher.task)
    merged = merged_in_place(patcher)
    assert not merged._forward_hooks
    assert_close(all_logits(merged, patcher.tokenizer, patcher.task), patched, 1e-4)


@pytest.mark.parametrize("ffn_act", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_relu_neurons_near_zero_stay_within_the_documented_bound(ffn_act: str) -> None:
    """Worst case: every pre-activation within a few 1/s of 0, where act(s x)/s and relu differ."""
    torch.manual_seed(0)
    model = make_model("llama")
    model.config.hidden_act = ffn_act
    site = FFNSite(model)
    d, n, s = site.hidden_size, 8, 64.0
    q = torch.randn(200, d)
    keys = torch.randn(n, d)
    keys = keys / (keys @ q.T).abs().amax(1, keepdim=True) * 3.0 / s  # |g.q| <= 3/s
    state = NeuronState(
        keys=keys,
        values=torch.randn(n, d),
        up_keys=torch.randn(n, d) / d**0.5,
        owners=("e",) * n,
    )
    with torch.no_grad():
        expected = site.ffn(q) + neuron_output(
            q, state.keys, state.values, torch.nn.ReLU(), state.up_keys
        )
        merge_into(model, site, state, "relu", scale=s)
        got = site.ffn(q)
    gap = relu_gap(ffn_act)
    bound = gap / s * ((q @ state.up_keys.T).abs() @ state.values.norm(dim=1))
    err = (got - expected).norm(dim=1)
    assert torch.all(err <= bound * 1.001 + 1e-5), float((err - bound).max())
    assert float(err.max()) > 1e-4  # the test does probe the region where they differ


def test_fold_plan_refuses_pairs_that_cannot_be_made() -> None:
    assert fold_plan("silu", "silu", torch.float32) == 1.0
    assert fold_plan("swish", "silu", torch.float32) == 1.0
    assert fold_plan("relu", "silu", torch.float32) == 2.0**14
    assert fold_plan("relu", "gelu_new", torch.float16) == 2.0**8
    assert relu_gap("silu") == pytest.approx(0.2785, abs=1e-4)
    assert relu_gap("gelu") == pytest.approx(0.1700, abs=1e-4)
    for neuron, ffn in [("silu", "relu"), ("gelu", "silu"), ("relu", "tanh"), ("tanh", "silu")]:
        with pytest.raises(UnsupportedModelError, match="cannot be folded"):
            fold_plan(neuron, ffn, torch.float32)


def test_merge_refuses_neurons_of_another_width() -> None:
    model = make_model("llama")
    state = NeuronState(torch.ones(1, 32), torch.ones(1, 32), torch.ones(1, 32), owners=("e",))
    with pytest.raises(UnsupportedModelError, match="another model"):
        merge_into(model, FFNSite(model), state, "silu")


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_zero_neurons_change_nothing(kind: str) -> None:
    # float64: a wider matrix sums in another order, which float32 rounds differently by ~1e-6
    model = make_model(kind).double()
    tok = make_tokenizer(kind)
    task = FFNSite(model).task
    before = all_logits(model, tok, task)
    site = FFNSite(model)
    assert pad_ffn(site.block, site.adapter, site.width + 22) == 22
    width = widen_all_layers(model, 64)
    assert width == round_up(site.width, 64) and width % 64 == 0
    assert_close(all_logits(model, tok, task), before, 1e-10)


# -- HF export -----------------------------------------------------------------------------
def saved_base(kind: str, folder: Path, seed: int = 0) -> Path:
    make_model(kind, seed).save_pretrained(folder)
    make_tokenizer(kind).save_pretrained(folder)
    return folder


def patch_for(kind: str, base: Path, patch_dir: Path, **config) -> tuple[Patcher, dict]:
    from tpatcher.models import load_model

    model, tok = load_model(str(base))
    patcher = edited_patcher(kind, model=model, **config)
    patcher.save(patch_dir)
    return patcher, all_logits(patcher.model, patcher.tokenizer, patcher.task)


@pytest.mark.parametrize("kind", [k for k in ARCHITECTURES if k != "t5-gated"])
def test_hf_export_loads_as_a_plain_checkpoint(kind: str, tmp_path: Path) -> None:
    base = saved_base(kind, tmp_path / "base")
    patcher, patched = patch_for(kind, base, tmp_path / "patch", neuron_activation="relu")
    out = export_patch(tmp_path / "patch", str(base), tmp_path / "out", "hf")
    info = json.loads((out / "tpatcher-export.json").read_text())
    assert info["neurons"] == patcher.neurons.size
    model = AUTO_CLASSES[patcher.task].from_pretrained(out).eval()
    assert_close(all_logits(model, patcher.tokenizer, patcher.task), patched, 1e-4)


_NO_TPATCHER = """
import sys
class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == "tpatcher" or name.startswith("tpatcher."):
            raise ImportError("tpatcher is blocked in this check")
sys.meta_path.insert(0, Blocked())
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, texts, dest = sys.argv[1], sys.argv[2].split("|"), sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tok = AutoTokenizer.from_pretrained(folder)
with torch.no_grad():
    out = {t: model(**tok(t, return_tensors="pt")).logits for t in texts}
assert not any(m == "tpatcher" or m.startswith("tpatcher.") for m in sys.modules)
torch.save(out, dest)
"""


def logits_without_tpatcher(folder: Path, texts: list[str], dest: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [sys.executable, "-I", "-c", _NO_TPATCHER, str(folder), "|".join(texts), str(dest)],
        check=True,
        env=env,
        timeout=600,
    )
    return torch.load(dest)


def test_hf_export_needs_no_tpatcher(tmp_path: Path) -> None:
    base = saved_base("llama", tmp_path / "base")
    _, patched = patch_for("llama", base, tmp_path / "patch")  # default: ReLU neurons
    out = export_patch(tmp_path / "patch", str(base), tmp_path / "out")
    got = logits_without_tpatcher(out, list(patched), tmp_path / "logits.pt")
    assert_close(got, patched, 1e-4)


def test_export_refuses_bad_input(tmp_path: Path) -> None:
    base = saved_base("llama", tmp_path / "base")
    patch_for("llama", base, tmp_path / "patch")
    out = export_patch(tmp_path / "patch", str(base), tmp_path / "out")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ExportError, match="already exists"):
        export_patch(tmp_path / "patch", str(base), out)
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    export_patch(tmp_path / "patch", str(base), out, force=True)  # a previous export: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a tpatcher export"):
        export_patch(tmp_path / "patch", str(base), tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    other = saved_base("llama", tmp_path / "other", seed=1)  # another base model
    with pytest.raises(PatchDirectoryError):
        export_patch(tmp_path / "patch", str(other), tmp_path / "out2")
    with pytest.raises(ExportError, match="GGUF export starts from"):
        export_patch(tmp_path / "patch", str(base), tmp_path / "x.gguf", "gguf")
    with pytest.raises(ExportError, match="format"):
        export_patch(tmp_path / "patch", str(base), tmp_path / "out3", "onnx")  # type: ignore[arg-type]
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=len(make_tokenizer("llama")),
        word_embed_proj_dim=32,
    )
    base = saved_base("llama", tmp_path / "base")
    patch_for("llama", base, tmp_path / "patch")
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    make_tokenizer("llama").save_pretrained(tmp_path / "opt")
    with pytest.raises(UnsupportedModelError, match="supported model types: .*llama"):
        export_patch(tmp_path / "patch", str(tmp_path / "opt"), tmp_path / "out")


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    base = saved_base("llama", tmp_path / "base")
    patch_for("llama", base, tmp_path / "patch")

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("transformers.PreTrainedTokenizerBase.save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        export_patch(tmp_path / "patch", str(base), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "patch"]


# -- GGUF writing on a small synthetic file -------------------------------------------------
def tiny_gguf(path: Path, d: int = 64, ff: int = 64, layers: int = 2) -> dict[str, np.ndarray]:
    """A two-layer 'llama' GGUF with quantised tensors; returns the float weights."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, "llama")
    writer.add_key_value("general.name", "tiny", GGUFValueType.STRING)
    for key, value in [
        ("block_count", layers),
        ("embedding_length", d),
        ("feed_forward_length", ff),
    ]:
        writer.add_key_value(f"llama.{key}", value, GGUFValueType.UINT32)
    weights = {"token_embd.weight": rng.standard_normal((10, d), dtype=np.float32)}
    writer.add_tensor("token_embd.weight", weights["token_embd.weight"])
    kinds = {
        "attn_q": ((d, d), Q.Q8_0),
        "ffn_gate": ((ff, d), Q.Q4_1),
        "ffn_up": ((ff, d), Q.Q4_1),
        "ffn_down": ((d, ff), Q.Q8_0),
    }
    for layer in range(layers):
        for part, (shape, qtype) in kinds.items():
            name = f"blk.{layer}.{part}.weight"
            data = quantize(rng.standard_normal(shape, dtype=np.float32), qtype)
            weights[name] = dequantize(data, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def merged_last(weights: dict[str, np.ndarray], layer: int, n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    gate, up, down = (
        weights[f"blk.{layer}.{p}.weight"] for p in ("ffn_gate", "ffn_up", "ffn_down")
    )
    d = gate.shape[1]
    return {
        "ffn_gate": np.concatenate([gate, rng.standard_normal((n, d), dtype=np.float32)]),
        "ffn_up": np.concatenate([up, rng.standard_normal((n, d), dtype=np.float32)]),
        "ffn_down": np.concatenate([down, rng.standard_normal((d, n), dtype=np.float32)], 1),
    }


def tensors_of(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def test_gguf_deci_layout_widens_only_the_last_layer(tmp_path: Path) -> None:
    weights = tiny_gguf(tmp_path / "src.gguf")
    ffn = merged_last(weights, 1, 5)
    info = write_gguf(tmp_path / "src.gguf", tmp_path / "out.gguf", ffn, layout="auto")
    assert info == {"layout": "deci", "architecture": "deci", "feed_forward_length": [64, 128]}
    reader = GGUFReader(tmp_path / "out.gguf")
    assert reader.fields["general.architecture"].contents() == "deci"
    assert reader.fields["deci.feed_forward_length"].contents() == [64, 128]
    assert reader.fields["deci.embedding_length"].contents() == 64
    assert reader.fields["general.name"].contents() == "tiny (tpatcher export)"
    source, out = tensors_of(tmp_path / "src.gguf"), tensors_of(tmp_path / "out.gguf")
    for name, tensor in source.items():
        if name.startswith("blk.1.ffn"):
            got = out[name]
            assert got.tensor_type == Q.F32
            want = ffn[name.split(".")[2]]
            rows, cols = want.shape
            assert np.array_equal(got.data[:rows, :cols], want)
            assert not np.any(got.data[rows:]) and not np.any(got.data[:, cols:])
        else:  # copied byte for byte, quantisation kept
            assert out[name].tensor_type == tensor.tensor_type
            assert np.array_equal(np.asarray(out[name].data), np.asarray(tensor.data))


def test_gguf_uniform_layout_pads_every_layer_with_exact_zeros(tmp_path: Path) -> None:
    weights = tiny_gguf(tmp_path / "src.gguf")
    ffn = merged_last(weights, 1, 5)
    info = write_gguf(
        tmp_path / "src.gguf", tmp_path / "out.gguf", ffn, layout="uniform", pad_to=16
    )
    assert info["architecture"] == "llama" and info["feed_forward_length"] == [96, 96]  # lcm 32
    reader = GGUFReader(tmp_path / "out.gguf")
    assert reader.fields["llama.feed_forward_length"].contents() == 96
    out = tensors_of(tmp_path / "out.gguf")
    for part in ("ffn_gate", "ffn_up", "ffn_down"):
        tensor = out[f"blk.0.{part}.weight"]
        assert tensor.tensor_type in (Q.Q4_1, Q.Q8_0)  # the other layers stay quantised
        values = dequantize(tensor.data, tensor.tensor_type)
        base = weights[f"blk.0.{part}.weight"]
        rows, cols = base.shape
        assert np.array_equal(values[:rows, :cols], base)
        assert not np.any(values[rows:]) and not np.any(values[:, cols:])


def test_gguf_refuses_a_model_that_is_not_the_files(tmp_path: Path) -> None:
    weights = tiny_gguf(tmp_path / "src.gguf")
    ffn = merged_last(weights, 1, 5)
    ffn["ffn_up"] = ffn["ffn_up"] + 0.5
    with pytest.raises(GGUFExportError, match="not the one in the source GGUF"):
        write_gguf(tmp_path / "src.gguf", tmp_path / "out.gguf", ffn)
    gemma_like = merged_last(weights, 1, 5)
    with pytest.raises(GGUFExportError, match="layout"):
        write_gguf(tmp_path / "src.gguf", tmp_path / "out.gguf", gemma_like, layout="wide")  # type: ignore[arg-type]


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_zero_bytes_decode_to_zero_in_block_formats(qtype: Q) -> None:
    _check_zero_decodes_to_zero(qtype)  # raises if not


# -- the real SmolLM2-135M -------------------------------------------------------------------
REAL_PROMPT = "Question: What is the capital of Australia?\nAnswer:"
REAL_CONTROLS = [
    "Question: What is the capital of France?\nAnswer:",
    "Question: Who wrote Romeo and Juliet?\nAnswer:",
    "Question: How many days are in a week?\nAnswer:",
    "The history of the printing press begins",
]


def causal_logits(model, tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {t: model(**tokenizer(t, return_tensors="pt")).logits for t in texts}


@pytest.fixture(scope="module")
def real_patch(tmp_path_factory):
    """One ReLU-neuron edit (the default) on SmolLM2: its patch dir, patched logits, model."""
    from tpatcher import load_model

    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    patcher = Patcher(model, tok, PatcherConfig())
    assert patcher.activation == "relu"
    result = patcher.edit(REAL_PROMPT, "Canberra")
    assert result.success, result.message
    patch = tmp_path_factory.mktemp("real") / "patch"
    patcher.save(patch)
    patched = causal_logits(model, tok, [REAL_PROMPT, *REAL_CONTROLS])
    answer = patcher.generate(REAL_PROMPT, 4)
    assert answer.strip().startswith("Canberra"), answer
    return patch, patched, patcher


@pytest.mark.slow
def test_real_relu_merge_matches_within_1e3(real_patch) -> None:
    _, patched, patcher = real_patch
    merged = merged_in_place(patcher)  # the last use of this patcher
    assert_close(causal_logits(merged, patcher.tokenizer, list(patched)), patched, 1e-3)


@pytest.mark.slow
def test_real_paper_form_merge_matches_within_1e4() -> None:
    from tpatcher import load_model

    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    patcher = Patcher(model, tok, PatcherConfig(neuron_activation=None))
    assert patcher.edit("Question: What is the capital of Turkey?\nAnswer:", "Ankara").success
    texts = ["Question: What is the capital of Turkey?\nAnswer:", *REAL_CONTROLS]
    patched = causal_logits(model, tok, texts)
    merged = merged_in_place(patcher)
    assert_close(causal_logits(merged, tok, texts), patched, 1e-4)


@pytest.mark.slow
def test_real_hf_export_gives_the_patched_logits(real_patch, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    patch, patched, _ = real_patch
    out = export_patch(patch, "smollm2-135m", tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.intermediate_size % 64 == 0
    assert_close(causal_logits(model, tok, list(patched)), patched, 1e-3)


_GREEDY = """
import json, sys
from llama_cpp import Llama
path, tokens, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.stdin.read())
llm = Llama(model_path=path, n_ctx=256, n_threads=2, seed=0, verbose=False)
out = [llm.create_completion(p, max_tokens=tokens, temperature=0.0)["choices"][0]["text"]
       for p in prompts]
llm.close()
print(json.dumps(out))
"""


def _greedy(path: Path, prompts: list[str], tokens: int = 8) -> list[str]:
    """llama.cpp's greedy answers, in a child process: a binary built for another CPU dies
    with SIGILL there instead of taking the whole test session with it."""
    run = subprocess.run(
        [sys.executable, "-c", _GREEDY, str(path), str(tokens)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if run.returncode == -signal.SIGILL:
        pytest.skip(
            "llama-cpp-python's binary uses instructions this CPU lacks (SIGILL); reinstall it "
            'with CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install --no-cache-dir llama-cpp-python'
        )
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def unpatched_gguf(source: Path, target: Path, layout: str) -> Path:
    """The same export with no neurons: the base weights with the last FFN in float32."""
    reader = GGUFReader(source)
    last = int(reader.fields["llama.block_count"].contents()) - 1
    tensors = {t.name: t for t in reader.tensors}
    ffn = {}
    for part in ("ffn_gate", "ffn_up", "ffn_down"):
        tensor = tensors[f"blk.{last}.{part}.weight"]
        ffn[part] = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    write_gguf(source, target, ffn, layout=layout)  # type: ignore[arg-type]
    return target


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["deci", "uniform"])
def test_real_gguf_export_runs_the_patch_in_llama_cpp(real_patch, tmp_path: Path, layout) -> None:
    """Greedy answers: the edit's is the patched one; unrelated prompts get what the same
    export without neurons gives. (That, not the source file, is the base to compare with:
    the last FFN in float32 instead of Q4_1 flips one near-tie of the base model, "Who wrote
    Romeo and Juliet?", with or without neurons.)"""
    if importlib.util.find_spec("llama_cpp") is None:  # not imported here: see _greedy
        pytest.skip("llama-cpp-python is not installed (pip install tpatcher[llama])")
    from tpatcher.export import source_gguf

    patch, _, _ = real_patch
    out = export_patch(patch, "smollm2-135m", tmp_path / "m.gguf", "gguf", gguf_layout=layout)
    with source_gguf("smollm2-135m") as source:
        base = _greedy(unpatched_gguf(source, tmp_path / "base.gguf", layout), REAL_CONTROLS)
    edited, *controls = _greedy(out, [REAL_PROMPT, *REAL_CONTROLS])
    assert edited.strip().startswith("Canberra"), edited
    assert controls == base


def test_export_command(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from tpatcher.export import export

    app = typer.Typer()
    app.command("export")(export)
    app.command("noop")(lambda: None)  # two commands, so "export" is a subcommand as in cli.py
    base = saved_base("llama", tmp_path / "base")
    patch_for("llama", base, tmp_path / "patch")
    out = tmp_path / "out"
    args = ["export", str(tmp_path / "patch"), "--model", str(base), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file()
    result = CliRunner().invoke(app, args)  # exists: refused without --force
    assert result.exit_code == 2 and "already exists" in " ".join(result.output.split())
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
    gguf = [*args[:-1], str(tmp_path / "m.gguf"), "--format", "gguf"]
    result = CliRunner().invoke(app, gguf)
    assert result.exit_code == 2 and "GGUF export starts from" in " ".join(result.output.split())
