"""Tests for the evaluation harness: metric functions, data splits, the sequential protocol on
the real SmolLM2 (short streams), resume after an interruption, and the ``bench`` command.

The real-model tests run torch on one thread: on a shared 2-core machine that is several
times faster than the default for these small batches.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpatcher.evaluation.data import load_task
from tpatcher.evaluation.metrics import (
    exact_match,
    first_line,
    mean,
    normalize_answer,
    perplexity,
    ratio,
    token_accuracy,
)
from tpatcher.evaluation.protocol import GENERAL_PROMPTS, BenchSettings, run_benchmark
from tpatcher.memory import default_prompts

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"no data directory at {DATA}")
SMALL = dict(heldout=4, memory_records=20, general_prompts=2, general_tokens=16)


# -- metric functions ----------------------------------------------------------------------
def test_normalize_answer() -> None:
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("A cat, an owl and THE dog.") == "cat owl and dog"
    assert normalize_answer("Theatre") == "theatre"  # articles only as whole words


def test_first_line() -> None:
    assert first_line("  Paris\n\nThe answer is") == "Paris"
    assert first_line("\n\nParis") == "Paris"  # leading whitespace (and newlines) dropped
    assert first_line("") == ""


@pytest.mark.parametrize(
    ("continuation", "target", "expected"),
    [
        (" Paris", "Paris", True),
        (" paris.\nQuestion:", "Paris", True),
        (" The University of Bern", "University of Bern", True),  # article dropped
        (" Paris is the capital", "Paris", True),  # the answer, then more words
        (" Serpensus\n\nQuestion:", "Serpens", False),  # a longer word is not the answer
        (" 13 June 197", "13 June 1971", False),  # cut short
        ("\nParis", "Paris", True),
        (" Lyon\nParis", "Paris", False),  # only the first line counts
        (" anything", "", False),  # an empty target never matches
    ],
)
def test_exact_match(continuation: str, target: str, expected: bool) -> None:
    assert exact_match(continuation, target) is expected


def test_token_accuracy() -> None:
    assert token_accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    assert token_accuracy([5], [5]) == 1.0
    with pytest.raises(ValueError):
        token_accuracy([1, 2], [1])
    with pytest.raises(ValueError):
        token_accuracy([], [])


def test_mean_ratio_perplexity() -> None:
    assert mean([True, False, True, True]) == 0.75
    assert mean([]) is None
    assert ratio(0.3, 0.6) == 0.5
    assert ratio(0.3, 0.0) is None and ratio(None, 0.5) is None
    assert math.isclose(perplexity(2 * math.log(4.0), 2), 4.0)


# -- data ------------------------------------------------------------------------------------
@needs_data
def test_zsre_splits_are_disjoint() -> None:
    data = load_task("zsre", DATA, 500, seed=3, heldout=100)
    stream = {it.uid for it in data.stream}
    held = {it.uid for it in data.train_heldout + data.test_heldout}
    assert len(data.stream) == 500 and len(data.train_heldout) == len(data.test_heldout) == 100
    assert not stream & held
    first = data.stream[0]
    assert first.prompt.startswith("Question: ") and first.prompt.endswith("\nAnswer:")
    assert "nq question" not in (first.loc_prompt or "")
    probes = {it.prompt for it in data.stream + data.train_heldout + data.test_heldout}
    probes |= {it.paraphrase for it in data.stream} | {it.loc_prompt for it in data.stream}
    assert not any(text.startswith(p) for text in data.memory_texts for p in probes if p)
    assert (
        load_task("zsre", DATA, 5, seed=3).stream[0].uid
        == load_task("zsre", DATA, 5, seed=3).stream[0].uid
    )
    counter = load_task("zsre", DATA, 5, seed=3, mode="counterfactual")
    assert counter.stream[0].target != load_task("zsre", DATA, 5, seed=3).stream[0].target


@needs_data
def test_counterfact_splits_are_disjoint() -> None:
    data = load_task("counterfact", DATA, 50, seed=1, heldout=20, memory_records=30)
    stream = {it.uid.split("-")[1] for it in data.stream}
    assert not stream & {it.uid.split("-")[1] for it in data.test_heldout}
    assert data.mode == "counterfactual" and len(data.memory_texts) == 30
    train_prompts = {it.prompt for it in data.train_heldout}
    assert not any(text.startswith(p) for text in data.memory_texts for p in train_prompts)


def test_general_prompts_are_not_memory_prompts() -> None:
    memory = {" ".join(p.split()[:3]).lower() for p in default_prompts()}
    assert not {" ".join(p.split()[:3]).lower() for p in GENERAL_PROMPTS} & memory


# -- the protocol on the real model ---------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _comparable(summary: dict) -> dict:
    """A method's result without wall-clock times and random edit ids (differ per run)."""
    drop = {"seconds_per_edit", "settings"}
    out = {k: v for k, v in summary.items() if k not in drop}
    out["records"] = [
        {k: v for k, v in r.items() if k not in ("seconds", "edit_id")} for r in summary["records"]
    ]
    return out


def test_generate_batches_by_budget_and_keeps_order() -> None:
    """Batching prompts by their token budget returns each prompt's own continuation."""
    from tiny import make_model, make_tokenizer

    from tpatcher.evaluation.metrics import Scorer

    tok = make_tokenizer("llama")
    model = make_model("llama")
    prompts = ["the capital of france is", "who wrote", "the river", "paris is in", "a cat"]
    budgets = [5, 1, 3, 1, 4]
    batched = Scorer(model, tok, batch_size=2).generate(prompts, budgets)
    alone = [
        Scorer(model, tok, batch_size=1).generate([p], [n])[0]
        for p, n in zip(prompts, budgets, strict=True)
    ]
    assert batched == alone
    assert all(len(text.split()) <= n for text, n in zip(alone, budgets, strict=True))
    assert len(alone[0].split()) > 1  # a long budget is not cut to the batch's shortest


@pytest.mark.slow
@needs_data
def test_scorer_tokenises_like_patcher(one_thread) -> None:
    from tpatcher import Patcher, load_model
    from tpatcher.evaluation.metrics import Scorer

    model, tok = load_model("smollm2-135m")
    scorer = Scorer(model, tok)
    patcher = Patcher(model, tok, memory_texts=["unused"])
    for prompt, target in [("Question: Who?\nAnswer:", "Ada Lovelace"), ("It is ", "blue")]:
        ids, targets, start = scorer.encode(prompt, target)
        example = patcher.encode(prompt, target)
        assert ids == example.inputs["input_ids"][0].tolist()
        assert targets == example.targets.tolist()
        assert start == int(example.positions[0])
        forced = scorer.forced([(prompt, target)])[0]
        assert forced.exact == (not patcher.is_mistake(prompt, target))


@pytest.mark.slow
@needs_data
def test_zsre_mistakes_resume_matches_uninterrupted(tmp_path: Path, one_thread) -> None:
    def settings(out: Path) -> BenchSettings:
        return BenchSettings(
            task="zsre",
            methods=["tpatcher"],
            edits=5,
            data_dir=str(DATA),
            out_dir=str(out),
            checkpoint_every=10,  # the interruption below must checkpoint by itself
            **SMALL,
        )

    whole = run_benchmark(settings(tmp_path / "whole"))
    first = run_benchmark(settings(tmp_path / "split"), stop_after=2, plots=False)
    assert not first["complete"]
    progress = json.loads((tmp_path / "split" / "tpatcher" / "progress.json").read_text())
    assert len(progress["records"]) == 2
    assert (tmp_path / "split" / "tpatcher" / "state" / "manifest.json").is_file()
    resumed = run_benchmark(settings(tmp_path / "split"))
    assert resumed["complete"]
    a, b = whole["methods"]["tpatcher"], resumed["methods"]["tpatcher"]
    assert _comparable(a) == _comparable(b)

    # the metrics are what the records say
    edited = [r for r in a["records"] if r["edited"]]
    assert a["items"] == 5 and a["edits"] == len(edited) == a["mistakes"]
    assert edited, "the base model should get some of 5 zsRE questions wrong"
    assert a["sr_tf"] == pytest.approx(mean([r["sr_tf"] for r in edited]))
    assert a["sr_em"] == pytest.approx(mean([r["sr_em"] for r in edited]))
    for r in edited:
        assert r["sr_em"] == exact_match(r["output"], r["target"])
        assert r["sr_tf_exact"] <= (r["sr_tf"] == 1.0)
    for key in ("rel_tf", "gen_tf", "loc_tf", "loc_em", "trainr_tf", "ppl_ratio"):
        assert a[key] is not None and a[key] >= 0
    assert a["loc_tf"] <= 1.0 and a["ppl_base"] == whole["base"]["ppl"]

    # results and plots on disk; a finished run is not redone
    out = tmp_path / "whole"
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["tpatcher"]["rel_tf"] == a["rel_tf"]
    for name in ("sme_running.png", "metrics_vs_edits.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    again = run_benchmark(settings(out), plots=False)
    assert _comparable(again["methods"]["tpatcher"]) == _comparable(a)


@pytest.mark.slow
@needs_data
def test_bench_command_counterfact(tmp_path: Path, one_thread) -> None:
    import typer
    from typer.testing import CliRunner

    from tpatcher.evaluation.command import bench

    app = typer.Typer()
    app.command("bench")(bench)
    app.command("noop")(lambda: None)  # two commands, so "bench" is addressed by name
    out = tmp_path / "cf"
    args = ["bench", "--task", "counterfact", "--methods", "tpatcher", "--edits", "3"]
    args += ["--data", str(DATA), "--out", str(out), "--heldout", "4", "--memory-records", "20"]
    args += ["--general-prompts", "2", "--general-tokens", "16", "--threads", "1"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "SR tf" in result.output or "SR" in result.output
    results = json.loads((out / "results.json").read_text())
    summary = results["methods"]["tpatcher"]
    assert results["task"]["mode"] == "counterfactual"
    assert summary["edits"] == 3  # counterfactual mode edits every item
    assert (out / "metrics_vs_edits.png").is_file() and (out / "sme_running.png").is_file()


class _FakeScorer:
    """Answers from fixed tables, so evaluate_state can be checked by hand."""

    task = "causal-lm"

    def __init__(self, forced: dict, generated: dict) -> None:
        self._forced, self._generated = forced, generated

    def forced(self, pairs):
        from tpatcher.evaluation.metrics import Forced

        return [Forced(list(self._forced[p]), [1] * len(self._forced[p])) for p, _ in pairs]

    def answer_budget(self, prompt, target):
        return 5

    def generate(self, prompts, budgets):
        return [self._generated[p] for p in prompts]

    def exact(self, pairs):
        texts = self.generate([p for p, _ in pairs], None)
        return [exact_match(g, t) for g, (_, t) in zip(texts, pairs, strict=True)], texts

    def perplexity(self, texts, prompts):
        return 6.0


def test_evaluate_state_by_hand() -> None:
    from tpatcher.evaluation.data import EditItem, TaskData
    from tpatcher.evaluation.protocol import evaluate_state

    items = [
        EditItem("a", "pa", "x", "qa", "la", "y"),
        EditItem("b", "pb", "x", "qb", "lb", "y"),
        EditItem("c", "pc", "x", None, "lc", "y"),
    ]
    held = [EditItem("h", "ph", "x")]
    data = TaskData("zsre", "mistakes", "causal-lm", items, held, held, [], "none")
    forced = {"pa": [1, 1], "pb": [1, 0], "pc": [1, 1], "qa": [0, 0], "qb": [1, 1]}
    forced |= {"la": [1, 1], "lb": [1, 2], "lc": [7, 7], "ph": [1, 0]}
    generated = {"pa": " x", "pb": " z", "pc": " x.", "qa": " x y", "qb": " no"}
    generated |= {"la": " Same", "lb": " other", "lc": "same\n", "ph": " x"}
    base = {
        "loc": {
            "a": {"pred": [1, 1], "text": "same"},
            "b": {"pred": [1, 1], "text": " other"},
            "c": {"pred": [7, 0], "text": " different"},
        },
        "train": {"tf": 1.0, "em": 0.5},
        "test": {"tf": 0.0, "em": 0.5},
        "general": {"texts": [], "prompts": [], "ppl": 4.0},
    }
    records = [
        {"uid": "a", "edited": True, "sr_tf_exact": True, "sr_em": True},
        {"uid": "b", "edited": True, "sr_tf_exact": True, "sr_em": False},
        {"uid": "c", "edited": True, "sr_tf_exact": False, "sr_em": True},
        {"uid": "a", "edited": False},  # not edited: ignored
    ]
    out = evaluate_state(_FakeScorer(forced, generated), data, base, records)
    assert out["n_edits"] == 3
    assert out["rel_tf"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["rel_em"] == pytest.approx(2 / 3)  # " z" misses; " x." matches after normalising
    assert out["gen_tf"] == pytest.approx(0.5) and out["gen_em"] == pytest.approx(0.5)
    assert out["er_tf"] == pytest.approx(0.5)  # a and b were right; b no longer is
    assert out["er_em"] == pytest.approx(1.0)  # a and c were right; both still are
    assert out["loc_tf"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert out["loc_em"] == pytest.approx(2 / 3)  # "Same" = "same"; "different" changed
    assert out["train_tf"] == 0.5 and out["trainr_tf"] == 0.5 and out["testr_tf"] is None
    assert out["train_em"] == 1.0 and out["trainr_em"] == 2.0
    assert out["ppl"] == 6.0 and out["ppl_ratio"] == 1.5


@pytest.mark.slow
@needs_data
def test_factcheck_tpatcher(tmp_path: Path, one_thread) -> None:
    factcheck = pytest.importorskip("tpatcher.evaluation.factcheck")
    folder = factcheck.classifier_dir(factcheck.ClassifierSettings())
    if not (folder / "config.json").is_file():
        pytest.skip("the claim classifier is not cached (training it takes minutes)")
    settings = BenchSettings(
        task="factcheck",
        methods=["tpatcher"],
        edits=8,
        data_dir=str(DATA),
        out_dir=str(tmp_path),
        heldout=8,
        memory_records=40,
    )
    results = run_benchmark(settings, plots=False)
    summary = results["methods"]["tpatcher"]
    edited = [r for r in summary["records"] if r["edited"]]
    assert summary["edits"] == summary["mistakes"] == len(edited)
    for r in edited:  # a classifier's scores are 0/1 and both forms agree
        assert r["sr_tf"] in (0.0, 1.0) and r["sr_em"] == (r["sr_tf"] == 1.0)
        assert r["sr_em"] == (r["output"] == r["target"])
    assert "ppl" not in summary and summary["trainr_tf"] == summary["trainr_em"]


def test_markdown_table_has_every_method_and_the_average() -> None:
    from tpatcher.evaluation.report import markdown_table

    done = {"complete": True, "rel_tf": 1.0, "gen_tf": 0.5, "loc_tf": 0.9, "rel_em": 1.0}
    results = {"methods": {"tpatcher": dict(done, device="cuda"), "ft": {"complete": False}}}
    lines = markdown_table(results).splitlines()
    assert lines[0] == "| metric | tpatcher | ft |"
    assert "| avg(Rel, Gen, Loc) tf | 0.800 | - |" in lines
    assert "| avg(Rel, Gen, Loc) em | 1.000 | - |" in lines  # only the defined parts
    assert "| Rel tf | 1.000 | (stopped) |" in lines
    assert lines[-1] == "| device | cuda | cpu |"


def test_plot_curves_merges_result_files_and_refuses_clashing_names(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    results = root / "benchmarks" / "results"
    script = [sys.executable, str(root / "benchmarks" / "plot_curves.py")]
    cf, relu = results / "sme_counterfact_t1000.json", results / "sme_counterfact_relu_t1000.json"
    png = tmp_path / "all.png"
    done = subprocess.run([*script, str(cf), f"{relu}:relu", "--out", str(png)], text=True)
    assert done.returncode == 0 and png.read_bytes()[:4] == b"\x89PNG"
    clash = subprocess.run(
        [*script, str(cf), str(relu), "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
    )
    assert clash.returncode != 0 and "two files give 'tpatcher'" in clash.stderr
    assert not (tmp_path / "x.png").exists()
    mixed = subprocess.run(
        [*script, str(cf), str(results / "sme_zsre_t500.json:z"), "--out", str(png)],
        capture_output=True,
        text=True,
    )
    assert mixed.returncode != 0 and "different tasks" in mixed.stderr
