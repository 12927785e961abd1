"""Tests for the evaluation harness: metric functions, data splits, the sequential protocol on
the real SmolLM2 (short streams), resume after an interruption, and the ``bench`` command.

The real-model tests run torch on one thread: on a shared 2-core machine that is several
times faster than the default for these small batches.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tpatcher.demo_facts import CONTROL_QUESTIONS, FACTS
from tpatcher.editing import EditResult
from tpatcher.evaluation import protocol
from tpatcher.evaluation.data import EditItem, TaskData, load_task
from tpatcher.evaluation.metrics import (
    exact_match,
    first_line,
    mean,
    normalize_answer,
    perplexity,
    ratio,
    token_accuracy,
)
from tpatcher.evaluation.protocol import (
    GENERAL_PROMPTS,
    METHODS,
    BenchSettings,
    edit_counts,
    general_questions,
    run_benchmark,
)
from tpatcher.memory import default_prompts, default_questions

SMALL = dict(
    heldout=4, memory_records=20, general_prompts=2, general_tokens=16, general_questions=8
)


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
def test_zsre_splits_are_disjoint(data_dir: Path) -> None:
    data = load_task("zsre", data_dir, 500, seed=3, heldout=100)
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
        load_task("zsre", data_dir, 5, seed=3).stream[0].uid
        == load_task("zsre", data_dir, 5, seed=3).stream[0].uid
    )
    counter = load_task("zsre", data_dir, 5, seed=3, mode="counterfactual")
    assert counter.stream[0].target != load_task("zsre", data_dir, 5, seed=3).stream[0].target


def test_counterfact_splits_are_disjoint(data_dir: Path) -> None:
    data = load_task("counterfact", data_dir, 50, seed=1, heldout=20, memory_records=30)
    stream = {it.uid.split("-")[1] for it in data.stream}
    assert not stream & {it.uid.split("-")[1] for it in data.test_heldout}
    assert data.mode == "counterfactual" and len(data.memory_texts) == 30
    train_prompts = {it.prompt for it in data.train_heldout}
    assert not any(text.startswith(p) for text in data.memory_texts for p in train_prompts)


def test_general_prompts_are_not_memory_prompts() -> None:
    memory = {" ".join(p.split()[:3]).lower() for p in default_prompts()}
    assert not {" ".join(p.split()[:3]).lower() for p in GENERAL_PROMPTS} & memory


def test_general_questions_are_200_distinct_and_not_memory() -> None:
    questions = general_questions()
    assert len(questions) == 200 and len(set(questions)) == 200
    memory = {normalize_answer(p) for p in default_prompts() + default_questions()}
    assert not {normalize_answer(q) for q in questions} & memory
    assert all(q.endswith("?") for q in questions)


def test_memory_questions_are_distinct_and_in_no_data_set(data_dir: Path) -> None:
    """The chat memory's everyday questions are not the locality or edit questions of any
    benchmark set, so no locality figure is measured on what memory held."""
    questions = [normalize_answer(q) for q in default_questions()]
    assert len(questions) > 250 and len(set(questions)) == len(questions)
    demo = [q for fact in FACTS for q in (fact.question, fact.paraphrase)] + [*CONTROL_QUESTIONS]
    assert not {normalize_answer(q) for q in demo} & set(questions)  # the demo's own checks
    for task, edits in (("zsre", 770), ("counterfact", 1000)):  # every record of the files
        data = load_task(task, data_dir, edits, heldout=10, memory_records=10)
        items = data.stream + data.train_heldout + data.test_heldout
        asked = {str(q) for it in items for q in (it.question, it.paraphrase_question)}
        asked |= {str(it.loc_question) for it in items} | set(data.memory_texts)
        assert not {normalize_answer(q) for q in asked} & set(questions)


def test_items_keep_their_raw_questions(data_dir: Path) -> None:
    item = load_task("zsre", data_dir, 3, seed=3).stream[0]
    assert item.prompt == f"Question: {item.question}\nAnswer:"
    assert item.paraphrase == f"Question: {item.paraphrase_question}\nAnswer:"
    assert item.loc_prompt == f"Question: {item.loc_question}\nAnswer:"
    cf = load_task("counterfact", data_dir, 3, seed=1, heldout=2, memory_records=2).stream[0]
    assert (cf.question, cf.paraphrase_question) == (cf.prompt, cf.paraphrase)
    assert cf.loc_question == cf.loc_prompt
    assert item.subject and item.subject in item.question and cf.subject in cf.prompt


def test_tpatcher_edits_get_the_items_subject() -> None:
    """The harness hands T-Patcher the record's subject (``subject_negatives``); a prompt
    that does not name it (a chat turn may not) edits without one instead of failing."""
    from test_core import make_patcher

    from tpatcher.evaluation.editors import TPatcherEditor

    editor = TPatcherEditor(make_patcher("llama", subject_negatives=2))
    outcome = protocol._safe_edit(editor, "the capital of france is", "berlin", [], "france")
    assert outcome.success and editor.patcher.edits[0].subject == "france"
    outcome = protocol._safe_edit(editor, "the capital of italy is", "tokyo", [], "spain")
    assert outcome.success and editor.patcher.edits[1].subject is None


def test_an_edit_gets_the_records_the_guessed_or_no_subject() -> None:
    item = EditItem(
        "a",
        "Question: Which language did Ada Lindqvist speak?\nAnswer:",
        "Swedish",
        question="Which language did Ada Lindqvist speak?",
        subject="Lindqvist",
    )
    assert protocol.edit_subject(item, "record") == "Lindqvist"
    assert protocol.edit_subject(item, "guess") == "Ada Lindqvist"
    assert protocol.edit_subject(item, "none") is None


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


def _zsre_settings(data_dir: Path, out: Path) -> BenchSettings:
    return BenchSettings(
        task="zsre",
        methods=["tpatcher"],
        edits=5,
        data_dir=str(data_dir),
        out_dir=str(out),
        checkpoint_every=10,  # an interruption must checkpoint by itself
        **SMALL,
    )


@pytest.fixture(scope="module")
def zsre_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_thread):
    """A finished five-edit zsRE run of T-Patcher on SmolLM2: (results, its --out folder)."""
    out = tmp_path_factory.mktemp("zsre") / "whole"
    return run_benchmark(_zsre_settings(data_dir, out)), out


@pytest.mark.slow
def test_zsre_mistakes_resume_matches_uninterrupted(
    data_dir: Path, tmp_path: Path, zsre_run
) -> None:
    def settings(out: Path) -> BenchSettings:
        return _zsre_settings(data_dir, out)

    whole, out = zsre_run
    first = run_benchmark(settings(tmp_path / "split"), stop_after=2, plots=False)
    assert not first["complete"]
    progress = json.loads((tmp_path / "split" / "tpatcher" / "progress.json").read_text())
    assert len(progress["records"]) == 2 and progress["state"] == "state-2"
    assert (tmp_path / "split" / "tpatcher" / "state-2" / "manifest.json").is_file()
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
        # an edit's record counts its steps and neurons; mining was off, so nothing mined
        assert r["steps"] >= 1 and r["neurons"] >= 1 and "mined" not in r
    for key in ("rel_tf", "gen_tf", "loc_tf", "loc_em", "trainr_tf", "ppl_ratio"):
        assert a[key] is not None and a[key] >= 0
    for key in ("rel_chat", "gen_chat", "loc_chat", "rel_q", "gen_q", "general_same"):
        assert a[key] is not None and 0 <= a[key] <= 1, key  # SmolLM2 has a chat template
    assert a["loc_tf"] <= 1.0 and a["ppl_base"] == whole["base"]["ppl"]

    # results and plots on disk; a finished run is not redone
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["tpatcher"]["rel_tf"] == a["rel_tf"]
    for name in ("sme_running.png", "metrics_vs_edits.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    again = run_benchmark(settings(out), plots=False)
    assert _comparable(again["methods"]["tpatcher"]) == _comparable(a)


def _diagnose(script: str, out: Path, data_dir: Path, *more: str) -> str:
    """The last lines a diagnosis script in ``benchmarks/`` prints for the run in ``out``."""
    root = Path(__file__).resolve().parents[1]
    args = ["--edits", "5", "--heldout", "4", "--memory-records", "20", "--data", str(data_dir)]
    args += more
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / script), str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.slow
def test_diagnosis_scripts_agree_with_the_run(data_dir: Path, zsre_run) -> None:
    """The benchmark diagnosis scripts reopen a finished run's patch and stream and count
    what the run's own metrics counted."""
    whole, out = zsre_run
    result = whole["methods"]["tpatcher"]
    edited = [r for r in result["records"] if r["edited"] and r.get("edit_id")]
    assert edited

    chat = _diagnose("chat_locality.py", out, data_dir).strip().splitlines()[-1]
    changed, _, total = chat.split()[:3]
    assert int(total) == len(edited)
    assert int(changed) == round((1 - result["loc_chat"]) * len(edited))

    ppl = _diagnose("perplexity_tokens.py", out, data_dir).splitlines()[0]
    before, after = (float(x.rstrip(";")) for x in ppl.split("perplexity ")[1].split()[:3:2])
    assert before == pytest.approx(result["ppl_base"], rel=1e-3)
    assert after == pytest.approx(result["ppl"], rel=1e-3)

    template = _diagnose("template_locality.py", out, data_dir).strip().splitlines()[-1]
    assert template.endswith(f"over {len(edited)} edited items")
    untouched = template.startswith("changed answer tokens: {}")
    assert untouched == (result["loc_tf"] == 1.0)  # no teacher-forced answer token moved

    general = _diagnose("general_answers.py", out, data_dir, "--general-questions", "8")
    share = float(general.strip().splitlines()[-1].split("unchanged: ")[1].split()[0])
    # chat turns on SmolLM2; batched with other prompts in the run (padding), alone here
    assert share == pytest.approx(result["general_same"], abs=0.13)  # one question of 8

    paraphrases = _diagnose("generality.py", out, data_dir)
    assert f"\n{len(edited)} edited items, edit_headroom" in paraphrases

    base_loc = json.loads((out / "base.json").read_text())["loc"]
    probed = [r for r in edited if r["uid"] in base_loc]
    first, second = _diagnose("locality.py", out, data_dir).splitlines()[:2]
    assert first.startswith(f"locality prompts: {len(probed)}; neurons: ")
    committed = float(second.split("committed: ")[1].split(";")[0])
    assert committed == pytest.approx(result["loc_tf"], abs=0.02)


@pytest.mark.slow
def test_bench_command_counterfact(data_dir: Path, tmp_path: Path, one_thread) -> None:
    import typer
    from typer.testing import CliRunner

    from tpatcher.evaluation.command import bench

    app = typer.Typer()
    app.command("bench")(bench)
    app.command("noop")(lambda: None)  # two commands, so "bench" is addressed by name
    out = tmp_path / "cf"
    args = ["bench", "--task", "counterfact", "--methods", "tpatcher", "--edits", "3"]
    args += ["--data", str(data_dir), "--out", str(out), "--heldout", "4"]
    args += ["--memory-records", "20"]
    args += ["--general-prompts", "2", "--general-tokens", "16", "--threads", "1"]
    args += ["--general-questions", "8"]
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
def test_factcheck_tpatcher(data_dir: Path, tmp_path: Path, one_thread) -> None:
    factcheck = pytest.importorskip("tpatcher.evaluation.factcheck")
    folder = factcheck.classifier_dir(factcheck.ClassifierSettings())
    if not (folder / "config.json").is_file():
        pytest.skip("the claim classifier is not cached (training it takes minutes)")
    settings = BenchSettings(
        task="factcheck",
        methods=["tpatcher"],
        edits=8,
        data_dir=str(data_dir),
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


def test_tables_show_the_real_use_metrics() -> None:
    from rich.console import Console

    from tpatcher.evaluation.report import COLUMNS, markdown_table, results_table

    keys = [key for _, key in COLUMNS]
    assert set(protocol.REAL_USE_KEYS) <= set(keys)
    done = {"complete": True, "rel_chat": 0.5, "gen_chat": 0.25, "loc_chat": 0.75}
    done |= {"rel_q": 1.0, "gen_q": None, "general_same": 0.9}
    results = {"methods": {"tpatcher": done, "factcheck-like": {"complete": True}}}
    lines = markdown_table(results).splitlines()
    assert "| Rel chat | 0.500 | - |" in lines and "| Gen q | - | - |" in lines
    assert "| General same | 0.900 | - |" in lines
    assert "| avg(Rel, Gen, Loc) chat | 0.500 | - |" in lines
    console = Console(width=200, record=True)
    console.print(results_table(results))
    text = console.export_text()
    assert "Loc chat" in text and "0.750" in text and "General same" in text


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


def test_evaluate_state_real_use_by_hand() -> None:
    from tpatcher.evaluation.protocol import evaluate_state

    class Scorer(_FakeScorer):
        tokenizer = _tiny_tokenizer()

        def answers(self, prompts, max_new_tokens=48):
            assert max_new_tokens == 7
            return [self._answers[p] for p in prompts]

    items = [
        EditItem("a", "pa", "Paris", question="qa", paraphrase_question="ra", loc_question="la"),
        EditItem("b", "pb", "Rome", question="qb", loc_question="lb"),
    ]
    data = TaskData("zsre", "mistakes", "causal-lm", items, [], [], [], "none")
    scorer = Scorer({"pa": [1], "pb": [1]}, {"pa": " Paris", "pb": " Rome"})
    chat = lambda q: f"{q} answer"  # noqa: E731 - the tiny chat template
    scorer._answers = {
        "qa": "It is in Paris, France.",  # bare questions: right
        "ra": "paris",
        "qb": "Romeo. Rome is not it.",  # only the first sentence counts: wrong
        chat("qa"): "The answer is Paris.",
        chat("ra"): "Lyon. Paris later.",
        chat("qb"): "Rome!",
        chat("la"): "The same thing.",
        chat("lb"): "Changed.",
        chat("g1"): "Yes, of course.",
        chat("g2"): "No.",
    }
    real = {
        "key": "k",
        "tokens": 7,
        "chat": True,
        "loc": {"a": "the same thing!", "b": "Not changed."},
        "general": {"questions": ["g1", "g2"], "answers": ["yes of course", "Maybe."]},
    }
    base = {"loc": {}, "train": {"tf": 1, "em": 1}, "test": {"tf": 1, "em": 1}, "real_use": real}
    records = [{"uid": "a", "edited": True}, {"uid": "b", "edited": True}]
    out = evaluate_state(scorer, data, base, records)
    assert out["rel_q"] == 0.5 and out["gen_q"] == 1.0
    assert out["rel_chat"] == 1.0 and out["gen_chat"] == 0.0
    assert out["loc_chat"] == 0.5 and out["general_same"] == 0.5
    no_chat = dict(real, chat=False, loc={}, general=None)
    out = evaluate_state(scorer, data, dict(base, real_use=no_chat), records)
    assert out["rel_q"] == 0.5 and out["rel_chat"] is None and out["general_same"] is None
    # without a chat template the general questions are asked in the template given
    asked = {"template": "Q: {q}\nA:", "questions": ["g1", "g2"], "answers": ["No\nmore", "x"]}
    scorer._answers |= {"Q: g1\nA:": "no.\nQ: other", "Q: g2\nA:": "y"}
    out = evaluate_state(scorer, data, dict(base, real_use=dict(no_chat, general=asked)), records)
    assert out["rel_chat"] is None and out["loc_chat"] is None and out["general_same"] == 0.5


def test_free_answers_stop_after_the_first_sentence() -> None:
    from tpatcher.evaluation.metrics import _SentenceDone

    class Tok:
        def batch_decode(self, ids, skip_special_tokens=True):
            return ["Paris. It is", "Paris.", " \nParis", "\nParis\n", "Dr. Smith", "in 3.5"]

    done = _SentenceDone(Tok(), 0)(torch.zeros(6, 1, dtype=torch.long), torch.zeros(6, 2))
    assert done.tolist() == [True, False, False, True, False, False]


def test_perplexity_scores_only_the_continuation() -> None:
    """Each continuation token's loss is the model's cross-entropy given everything before
    it; the prompt's own tokens are not scored, and a text that is all prompt adds nothing."""
    from tiny import make_model, make_tokenizer

    from tpatcher.evaluation.metrics import Scorer

    tok, model = make_tokenizer("llama"), make_model("llama")
    scorer = Scorer(model, tok)
    prompt, text = "the capital of", "the capital of france is paris"
    ids = tok(text, return_tensors="pt")["input_ids"]
    start = len(tok(prompt)["input_ids"])
    with torch.no_grad():
        full = model(input_ids=ids).logits[0, start - 1 : -1]
    nll = scorer.continuation_nll(text, prompt)
    assert nll.numel() == ids.shape[1] - start
    expected = torch.nn.functional.cross_entropy(full, ids[0, start:], reduction="none")
    assert torch.allclose(nll, expected, atol=1e-5)
    assert scorer.continuation_nll(prompt, prompt).numel() == 0
    ppl = scorer.perplexity([text, prompt], [prompt, prompt])
    assert math.isclose(ppl, math.exp(float(nll.mean())), rel_tol=1e-6)


def test_scorer_encodes_with_encode_edit() -> None:
    from tiny import make_model

    from tpatcher.encoding import encode_edit
    from tpatcher.evaluation.metrics import Scorer

    model, tok = make_model("llama"), _tiny_tokenizer()
    scorer = Scorer(model, tok)
    for prompt, target in [("the capital of france is", "paris"), ("who wrote ", "the novel")]:
        example = encode_edit(tok, model, prompt, target, task="causal-lm")
        ids, targets, start = scorer.encode(prompt, target)
        assert ids == example.inputs["input_ids"][0].tolist()
        assert targets == example.targets.tolist() and start == int(example.positions[0])
        with torch.no_grad():
            logits = model(**example.inputs).logits[0, example.positions]
        assert scorer.forced([(prompt, target)])[0].predicted == logits.argmax(-1).tolist()
        assert scorer.answer_budget(prompt, target) == len(targets) + scorer.extra_tokens
    model.train()
    scorer.forced([("the cat", "sleeps")])
    scorer.generate(["the cat"], [2])
    assert model.training and tok.padding_side == "right"  # both restored


# -- settings and the method table ---------------------------------------------------------
def test_settings_are_validated_before_any_work() -> None:
    def settings(**changes) -> BenchSettings:
        base = dict(task="zsre", methods=["tpatcher"], edits=2, data_dir="d", out_dir="o")
        return BenchSettings(**dict(base, **changes))

    settings().validate()
    cases = [
        ({"patcher": {"max_step": 5}}, "did you mean 'max_steps'"),
        ({"patcher": {"lr": -1.0}}, "invalid T-Patcher settings"),
        ({"methods": ["tpatcher", "rome"]}, "unknown method 'rome'"),
        ({"methods": []}, "no methods"),
        ({"task": "squad"}, "unknown task"),
        ({"edit_format": "json"}, "unknown edit format"),
        ({"edit_format": "chat", "task": "factcheck"}, "chat edits need"),
        ({"edit_format": "joint", "methods": ["tpatcher", "ft"]}, "tpatcher only"),
        ({"edit_format": "lead", "methods": ["grace"]}, "tpatcher only"),
        ({"method_settings": {"fine-tune": {}}}, "not a baseline method"),
        ({"methods": ["ft"], "method_settings": {"ft": {"learning_rate": 1}}}, "no setting"),
        ({"subjects": "auto"}, "unknown subject source"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            settings(**changes).validate()
    template = settings(methods=["ft"])
    assert template.method_key("ft") != settings(methods=["ft"], edit_format="chat").method_key(
        "ft"
    )
    # a setting left at what its absence meant keys as before it existed; turned on, it differs
    assert "close_target_word" not in settings().patcher_config().key_fields()
    closing = settings(patcher={"close_target_word": True})
    assert closing.method_key("tpatcher") != settings().method_key("tpatcher")
    guessed = settings(subjects="guess")  # another T-Patcher run; baselines take no subject
    assert guessed.method_key("tpatcher") != settings().method_key("tpatcher")
    assert guessed.method_key("ft") == settings().method_key("ft")


def test_method_table_imports_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"tpatcher", "ft", "ftkl", "grace", "wise", "memoir"} <= set(METHODS)
    assert protocol.EDITORS["wise"] == "tpatcher.evaluation.wise:WiseEditor"
    assert protocol.EDITORS["memoir"] == "tpatcher.evaluation.memoir:MemoirEditor"
    assert protocol.editor_class("grace").__name__ == "GraceEditor"
    monkeypatch.setitem(protocol.EDITORS, "gone", "tpatcher.evaluation.no_such_module:X")
    monkeypatch.setattr(protocol, "METHODS", (*protocol.METHODS, "gone"))
    assert not protocol.method_available("gone") and protocol.method_available("ft")
    with pytest.raises(ValueError, match="no_such_module, which is missing"):
        protocol.editor_class("gone")


def test_bench_refuses_an_unknown_patcher_setting_at_once(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from tpatcher.evaluation.command import bench

    app = typer.Typer()
    app.command("bench")(bench)
    app.command("noop")(lambda: None)
    out = tmp_path / "out"
    args = ["bench", "--patcher", '{"max_step": 5}', "--out", str(out), "--data", str(tmp_path)]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    text = " ".join(
        "".join(
            c if c.isprintable() and c not in "│╭╮╰╯─" else " " for c in (result.output)
        ).split()
    )
    assert result.exit_code == 2, result.output
    assert "PatcherConfig has no field 'max_step' (did you mean 'max_steps'?)" in text
    assert not out.exists()  # nothing was started
    bad_json = CliRunner().invoke(app, ["bench", "--patcher", "{max_steps: 5}"])
    assert bad_json.exit_code == 2 and "not valid JSON" in bad_json.output


def test_bench_patcher_option_names_the_papers_form() -> None:
    from tpatcher import PatcherConfig
    from tpatcher.evaluation.command import _patcher_option

    assert PatcherConfig.from_dict(_patcher_option(" paper ")) == PatcherConfig.paper()
    assert _patcher_option('{"max_steps": 5}') == {"max_steps": 5}


# -- the protocol on a tiny model ----------------------------------------------------------
def _tiny_tokenizer(chat: bool = True):
    """The tiny word tokenizer, with a one-line chat template (the question, then "answer")."""
    from tiny import make_tokenizer

    tok = make_tokenizer("llama")
    if chat:
        tok.chat_template = (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} answer{% endif %}"
        )
    return tok


@pytest.fixture
def tiny_bench(monkeypatch: pytest.MonkeyPatch, one_thread):
    """``run_benchmark`` on a tiny random llama and a hand-made task (no data directory);
    returns a settings factory and a switch for the chat template."""
    from tiny import MEMORY_TEXTS, make_model

    def item(i: int, prompt: str, target: str, question: str) -> EditItem:
        loc = ("the river flows through", "rome", "where is the river")
        para = prompt.replace("the", "a", 1)
        return EditItem(
            f"t{i}", prompt, target, para, loc[0], loc[1], question, f"{question} today", loc[2]
        )

    stream = [
        item(0, "the capital of france is", "berlin", "what is the capital of france"),
        item(1, "the capital of spain is", "tokyo", "what is the capital of spain"),
        item(2, "the famous author wrote", "music", "who wrote the famous novel"),
        item(3, "the dog eats", "fish", "what does the dog eat"),
    ]
    held = [EditItem("h0", "the capital of italy is", "rome")]
    data = TaskData(
        "zsre", "counterfactual", "causal-lm", stream, held, held, list(MEMORY_TEXTS), "tiny"
    )
    chat = {"on": True}
    monkeypatch.setattr(protocol, "load_task", lambda *args, **kwargs: data)
    monkeypatch.setattr(
        protocol,
        "load_base_model",
        lambda settings, kind: (make_model("llama"), _tiny_tokenizer(chat["on"])),
    )

    def settings(out: Path, **changes) -> BenchSettings:
        small = dict(general_prompts=2, general_tokens=8, general_questions=5, heldout=1)
        small.update(methods=["tpatcher", "ft"], memory_records=5, checkpoint_every=1)
        small.update(changes)
        return BenchSettings(
            task="zsre", edits=len(stream), data_dir=str(out.parent), out_dir=str(out), **small
        )

    return settings, chat


def test_tiny_resume_after_a_crash_matches_uninterrupted(
    tiny_bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = tiny_bench
    whole = run_benchmark(settings(tmp_path / "whole"), plots=False)["methods"]
    write = protocol._write_json
    progress_writes = []

    def crash_on_third(path: Path, data) -> None:
        if path.name == "progress.json":
            progress_writes.append(path)
            if len(progress_writes) == 3:  # state-3 is written, progress.json still says 2
                raise RuntimeError("power cut")
        write(path, data)

    monkeypatch.setattr(protocol, "_write_json", crash_on_third)
    split = tmp_path / "split"
    with pytest.raises(RuntimeError, match="power cut"):
        run_benchmark(settings(split, methods=["tpatcher"]), plots=False)
    monkeypatch.setattr(protocol, "_write_json", write)
    folder = split / "tpatcher"
    progress = json.loads((folder / "progress.json").read_text())
    assert len(progress["records"]) == 2 and progress["state"] == "state-2"
    assert (folder / "state-3").is_dir() and not (folder / "state-1").exists()
    assert "patcher_counter" not in progress
    # ft has no save_state: stopped after 2 items, it is rebuilt by replaying its edits
    stopped = run_benchmark(settings(split, methods=["ft"]), stop_after=2, plots=False)
    assert not stopped["complete"]
    assert "state" not in json.loads((split / "ft" / "progress.json").read_text())
    resumed = run_benchmark(settings(split), plots=False)["methods"]
    for method in ("tpatcher", "ft"):
        assert _comparable(resumed[method]) == _comparable(whole[method]), method
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("state")) == ["state-4"]
    summary = whole["tpatcher"]
    for key in ("rel_chat", "gen_chat", "loc_chat", "rel_q", "gen_q", "general_same"):
        assert summary[key] is not None and 0 <= summary[key] <= 1, key
    base = json.loads((tmp_path / "whole" / "base.json").read_text())
    assert len(base["real_use"]["general"]["answers"]) == 5
    assert set(base["real_use"]["loc"]) == {"t0", "t1", "t2", "t3"}


def test_tiny_chat_edits_and_no_chat_template(
    tiny_bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, chat = tiny_bench
    edited: list[str] = []
    safe_edit = protocol._safe_edit

    def spy(editor, prompt, target, also=None, subject=None):
        edited.append(prompt)
        return safe_edit(editor, prompt, target, also, subject)

    monkeypatch.setattr(protocol, "_safe_edit", spy)
    results = run_benchmark(
        settings(tmp_path / "chat", methods=["grace"], edit_format="chat"), plots=False
    )
    assert edited[0] == "what is the capital of france answer"  # the question, chat-templated
    assert results["task"]["edit_format"] == "chat"
    summary = results["methods"]["grace"]
    assert summary["edits"] == 4 and summary["rel_chat"] is not None
    chat["on"] = False  # a tokenizer without a chat template: chat metrics undefined
    plain = run_benchmark(settings(tmp_path / "plain", methods=["grace"]), plots=False)
    summary = plain["methods"]["grace"]
    assert summary["rel_chat"] is None and summary["loc_chat"] is None
    assert summary["rel_q"] is not None  # general questions asked in the zsRE template:
    general = json.loads((tmp_path / "plain" / "base.json").read_text())["real_use"]["general"]
    assert general["template"] == "Question: {q}\nAnswer:" and len(general["answers"]) == 5
    assert summary["general_same"] is not None
    stale = json.loads((tmp_path / "plain" / "base.json").read_text())  # from before them:
    del stale["real_use"]["general"]  # the template answers are added on the next run
    (tmp_path / "plain" / "base.json").write_text(json.dumps(stale))
    run_benchmark(settings(tmp_path / "plain", methods=["grace"]), plots=False)
    again = json.loads((tmp_path / "plain" / "base.json").read_text())["real_use"]["general"]
    assert again == general
    with pytest.raises(ValueError, match="needs a model with a chat template"):
        run_benchmark(settings(tmp_path / "no", methods=["grace"], edit_format="chat"), plots=False)
    off = run_benchmark(settings(tmp_path / "off", methods=["grace"], real_use=False), plots=False)
    assert "rel_q" not in off["methods"]["grace"]
    assert "real_use" not in json.loads((tmp_path / "off" / "base.json").read_text())


def test_base_from_reuses_the_unedited_outputs_of_the_same_stream(
    tiny_bench, tmp_path: Path
) -> None:
    """``base_from``: a run in another edit format takes the earlier run's base.json instead
    of evaluating the unedited model again; another stream's, or none, is refused."""
    settings, _ = tiny_bench
    first = tmp_path / "chat"
    run_benchmark(settings(first, methods=["grace"], edit_format="chat"), plots=False)
    said: list[str] = []
    reuse = settings(tmp_path / "template", methods=["grace"], base_from=str(first))
    results = run_benchmark(reuse, plots=False, on_status=said.append)
    assert any("reusing the unedited model's outputs" in line for line in said), said
    assert not any("evaluating the unedited model" in line for line in said), said
    base = (tmp_path / "template" / "base.json").read_text()
    assert base == (first / "base.json").read_text()
    assert results["methods"]["grace"]["rel_chat"] is not None
    for changes, message in (
        ({"heldout": 2}, "of another stream or model"),
        ({"base_from": str(tmp_path / "none")}, "no readable base.json"),
    ):
        bad = settings(tmp_path / "bad", methods=["grace"], **{"base_from": str(first), **changes})
        with pytest.raises(ValueError, match=message):
            bad.validate()
    assert not (tmp_path / "bad").exists()


def test_tiny_lead_edits_also_train_the_models_own_answer_lead(
    tiny_bench, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, _ = tiny_bench
    wordings: list[list[str]] = []
    safe_edit = protocol._safe_edit

    def spy(editor, prompt, target, also=None, subject=None):
        wordings.append(list(also or []))
        return safe_edit(editor, prompt, target, also, subject)

    monkeypatch.setattr(protocol, "_safe_edit", spy)
    run_benchmark(
        settings(tmp_path / "lead", methods=["tpatcher"], edit_format="lead"), plots=False
    )
    assert wordings and all(len(w) in (2, 3) for w in wordings)
    leads = [w[2] for w in wordings if len(w) == 3]
    assert leads, "no item got an answer lead"
    assert all(
        lead.startswith(w[0]) and len(lead) > len(w[0])
        for w, lead in zip([w for w in wordings if len(w) == 3], leads, strict=True)
    )


def test_tpatcher_editor_state_links_old_edits_and_reloads(tmp_path: Path) -> None:
    from tiny import MEMORY_TEXTS, make_model

    from tpatcher import Patcher
    from tpatcher.evaluation.editors import TPatcherEditor

    def editor() -> TPatcherEditor:
        model, tok = make_model("llama"), _tiny_tokenizer()
        return TPatcherEditor(Patcher(model, tok, memory_texts=MEMORY_TEXTS))

    first = editor()
    assert first.edit("the capital of france is", "berlin").success
    first.save_state(tmp_path / "state-1")
    assert first.edit("the dog eats", "fish").success
    first.save_state(tmp_path / "state-2")
    old = next((tmp_path / "state-1").rglob("*.safetensors"))
    same = tmp_path / "state-2" / old.relative_to(tmp_path / "state-1")
    assert same.stat().st_ino == old.stat().st_ino  # linked, not written again
    second = editor()
    second.load_state(tmp_path / "state-2")
    assert second.patcher.edit_ids == first.patcher.edit_ids
    assert second.patcher.edits_attempted == first.patcher.edits_attempted == 2


def test_joint_edits_train_the_chat_turn_and_the_bare_question_too() -> None:
    from tiny import make_tokenizer

    item = EditItem("1", "Question: Who wrote X?\nAnswer:", "Y", question="Who wrote X?")
    tok = make_tokenizer("llama")
    assert protocol.other_wordings(item, "template", tok) == []
    assert protocol.other_wordings(item, "joint", tok) == ["Who wrote X?"]
    tok.chat_template = "{% for m in messages %}<s>{{ m['content'] }}{% endfor %}<s>"
    chat, bare = protocol.other_wordings(item, "joint", tok)
    assert "Who wrote X?" in chat and chat != bare == "Who wrote X?"
    assert protocol.other_wordings(item, "lead", tok) == [chat, bare]  # the lead comes later


def test_edit_counts_keep_steps_neurons_mined_and_dropped() -> None:
    result = EditResult("e1", True, 12, 0.5, 3, {"total": 0.1, "mined": 4.0, "dropped": 1.0})
    assert edit_counts(result.to_dict()) == {"steps": 12, "neurons": 3, "mined": 4, "dropped": 1}
    # a baseline's details (WISE: losses as a list) keep only what they have
    assert edit_counts({"steps": 70, "losses": [1.0, 0.5], "tail": True}) == {"steps": 70}
    assert edit_counts({}) == {}
