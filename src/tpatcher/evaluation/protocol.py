"""The sequential model-editing protocol, final-model metrics, checkpoints and resume.

Paper protocol (Huang et al. 2023, SME): a seeded random stream; each item is checked against
the *current* model and edited only if it is a mistake (``mode="mistakes"``; teacher-forced:
any target token wrong, or the wrong label) or always (``mode="counterfactual"``). Right after
each edit: SR (the edit input is now right) and GR (its paraphrase is right). At the end: ER,
TrainR, TestR; and the WISE/EasyEdit final-model metrics Rel, Gen, Loc over all edits, plus
perplexity on general text before and after. See :func:`evaluate_state` for definitions.

Resume: each method keeps ``<out>/<method>/progress.json`` (per-item records, written
atomically after every ``checkpoint_every`` items) and, for T-Patcher, the patch directory
``<out>/<method>/state`` (:meth:`Patcher.save`). Resuming T-Patcher loads the patch, rolls
back any edit saved after the last progress write, and restores the patcher's edit counter (it
seeds the new neurons), so the resumed run is identical to an uninterrupted one. An editor
with ``save_state(dir)`` / ``load_state(dir)`` methods is checkpointed the same way; any
other editor is rebuilt by replaying its recorded edits in order on a fresh model
(deterministic methods give the same model; the per-edit SR/GR already recorded are kept).
A finished method (``final.json``) is not rerun.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import PatcherConfig
from ..patcher import Patcher
from .data import EditItem, TaskData, load_task
from .editors import Editor, EditOutcome, TPatcherEditor
from .metrics import Scorer, agreement, first_line, mean, normalize_answer, ratio

METHODS = ("tpatcher", "ft", "ftkl", "grace")
BASELINES = {"ft": "FTEditor", "ftkl": "FTKLEditor", "grace": "GraceEditor"}

#: Prompts for the general-text perplexity check. Disjoint from tpatcher's memory prompts
#: (``tpatcher/data/memory_prompts.txt``) and from every data set's prompts.
GENERAL_PROMPTS = (
    "Long ago, a fisherman and his daughter",
    "Baking bread at home takes patience, because",
    "Dear diary, today I finally",
    "Sleeping well before an exam matters because",
    "Because my bus was late again,",
    "Green plants turn sunlight into",
    "If you want to start running, the first step is",
    "Our team meeting this morning was about",
    "On the rocky island, a lighthouse keeper",
    "Keeping houseplants alive is easier if you",
    "When the power went out during the storm,",
    "Weather changes daily, whereas climate",
    "My grandmother's kitchen always smelled of",
    "To write a clear email, you should",
    "The museum's newest exhibit shows",
    "After the concert ended, the crowd",
)
GENERAL_SOURCE = (
    "continuations sampled (top-p 0.95, torch seed = run seed) by the unedited model from "
    "tpatcher.evaluation.protocol.GENERAL_PROMPTS"
)

ItemHook = Callable[[str, int, int, dict[str, Any]], None]


@dataclass
class BenchSettings:
    """One benchmark run. ``patcher`` overrides :class:`PatcherConfig` fields; ``method_settings``
    passes keyword settings to each baseline's constructor."""

    task: str
    methods: list[str]
    edits: int
    data_dir: str
    out_dir: str
    model: str = "smollm2-135m"
    seed: int = 0
    mode: str | None = None
    heldout: int = 100
    memory_records: int = 1000
    checkpoint_every: int = 10
    eval_every: int = 0
    general_prompts: int = 16
    general_tokens: int = 48
    extra_tokens: int = 4
    batch_size: int = 16
    patcher: dict[str, Any] = field(default_factory=dict)
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    classifier_cache: str | None = None
    device: str = "cpu"

    def key(self) -> str:
        """Identifies the data and base evaluation; a resumed run must match it."""
        parts = [self.task, self.mode, self.edits, self.model, self.seed, self.heldout]
        parts += [self.memory_records, self.general_prompts, self.general_tokens, self.extra_tokens]
        parts += [str(Path(self.data_dir).resolve())]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def patcher_config(self) -> PatcherConfig:
        """T-Patcher's config: the defaults, ``patcher``'s overrides and the run's seed."""
        return PatcherConfig.from_dict(dict(self.patcher, seed=self.seed))

    def method_key(self, method: str) -> str:
        """The run key plus the method's own settings: changing them starts the method over.

        T-Patcher's are the whole resolved config, so a change of a default does too."""
        own: dict[str, Any]
        if method == "tpatcher":
            own = self.patcher_config().to_dict()
        else:
            own = self.method_settings.get(method, {})
        blob = json.dumps([self.key(), method, own], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# -- small helpers -----------------------------------------------------------------------
def _write_json(path: Path, data: Any) -> None:
    """Atomic JSON write: a crash leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, default=str), "utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def load_base_model(
    settings: BenchSettings, kind: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh, unedited model for the task (every method gets its own), on ``settings.device``."""
    if kind == "seq-cls":
        from .factcheck import load_claim_classifier

        model, tok = load_claim_classifier(settings.data_dir, settings.classifier_cache)
    else:
        from ..models import load_model

        model, tok = load_model(settings.model)
    return model.to(settings.device), tok


def _scorer(model: PreTrainedModel, tok: PreTrainedTokenizerBase, s: BenchSettings, kind: str):
    return Scorer(model, tok, kind, batch_size=s.batch_size, extra_tokens=s.extra_tokens)


# -- scoring -----------------------------------------------------------------------------
def score_items(scorer: Scorer, pairs: list[tuple[str, str | int]]) -> list[dict[str, Any]]:
    """Per pair: ``tf`` token accuracy, ``tf_exact`` (all tokens), ``em`` greedy exact match.

    For a classifier all three are whether the predicted label is the target.
    """
    if not pairs:
        return []
    if scorer.task == "seq-cls":
        labels = scorer.classify([p for p, _ in pairs])
        return [
            {"tf": float(y == t), "tf_exact": y == t, "em": y == t, "output": y}
            for y, (_, t) in zip(labels, pairs, strict=True)
        ]
    text_pairs = [(p, str(t)) for p, t in pairs]
    forced = scorer.forced(text_pairs)
    ems, texts = scorer.exact(text_pairs)
    return [
        {"tf": f.accuracy, "tf_exact": f.exact, "em": e, "output": g}
        for f, e, g in zip(forced, ems, texts, strict=True)
    ]


def base_outputs(scorer: Scorer, data: TaskData, settings: BenchSettings) -> dict[str, Any]:
    """What the unedited model answers: locality probes, held-out accuracy, general text."""
    stream_loc = [it for it in data.stream if it.loc_prompt is not None]
    loc: dict[str, Any] = {}
    if scorer.task == "seq-cls":
        labels = scorer.classify([it.loc_prompt for it in stream_loc])  # type: ignore[misc]
        loc = {it.uid: {"label": y} for it, y in zip(stream_loc, labels, strict=True)}
    else:
        pairs = [(it.loc_prompt, str(it.loc_target)) for it in stream_loc]
        forced = scorer.forced(pairs)  # type: ignore[arg-type]
        budgets = [scorer.answer_budget(p, t) for p, t in pairs]  # type: ignore[arg-type]
        texts = scorer.generate([p for p, _ in pairs], budgets)  # type: ignore[misc]
        loc = {
            it.uid: {"pred": f.predicted, "text": g}
            for it, f, g in zip(stream_loc, forced, texts, strict=True)
        }
    base: dict[str, Any] = {"key": settings.key(), "loc": loc}
    for name, items in (("train", data.train_heldout), ("test", data.test_heldout)):
        scores = score_items(scorer, [(it.prompt, it.target) for it in items])
        base[name] = {
            "tf": mean([s["tf"] for s in scores]),
            "em": mean([s["em"] for s in scores]),
            "n": len(scores),
        }
    if scorer.task != "seq-cls":
        prompts = list(GENERAL_PROMPTS[: settings.general_prompts])
        texts = _sample(scorer, prompts, settings.general_tokens, settings.seed)
        base["general"] = {
            "source": GENERAL_SOURCE,
            "prompts": prompts,
            "texts": texts,
            "ppl": scorer.perplexity(texts, prompts),
        }
    return base


def _sample(scorer: Scorer, prompts: list[str], tokens: int, seed: int) -> list[str]:
    """Prompt + sampled continuation, one prompt at a time (no padding to perturb sampling)."""
    torch.manual_seed(seed)
    texts = []
    tok = scorer.tokenizer
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(scorer.device)
        with torch.no_grad():
            out = scorer.model.generate(
                **enc,
                max_new_tokens=tokens,
                do_sample=True,
                top_p=0.95,
                pad_token_id=tok.pad_token_id,
            )
        texts.append(
            prompt + tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    return texts


def evaluate_state(
    scorer: Scorer,
    data: TaskData,
    base: dict[str, Any],
    records: list[dict[str, Any]],
    *,
    general: bool = True,
) -> dict[str, Any]:
    """Metrics of the model as it is now, over the edits in ``records`` so far.

    * ``rel_*``: over every item an edit was requested for, the edit prompt scored now.
    * ``gen_*``: the same for the paraphrases (items that have one).
    * ``loc_tf``: share of locality-answer positions where the teacher-forced argmax equals
      the unedited model's; ``loc_em``: the greedy continuation's normalised first line
      equals the unedited model's (classifier: the label equals the unedited label).
    * ``er_tf``: of the edits that were fully right (teacher-forced) just after they were
      made, the share still fully right now; ``er_em`` likewise for greedy exact match.
    * ``train_*``/``test_*``: accuracy on the held-out sets; ``trainr_*``/``testr_*``: that
      divided by the unedited model's accuracy.
    * ``ppl``: perplexity of the general text; ``ppl_ratio``: now / unedited.
    """
    by_uid = {it.uid: it for it in data.stream}
    edited = [r for r in records if r["edited"]]
    items = [by_uid[r["uid"]] for r in edited]
    out: dict[str, Any] = {"n_edits": len(edited)}
    rel = score_items(scorer, [(it.prompt, it.target) for it in items])
    for key in ("tf", "em"):
        out[f"rel_{key}"] = mean([s[key] for s in rel])
    para = [it for it in items if it.paraphrase]
    gen = score_items(scorer, [(it.paraphrase, it.target) for it in para])  # type: ignore[misc]
    for key in ("tf", "em"):
        out[f"gen_{key}"] = mean([s[key] for s in gen])
    out["er_tf"] = mean(
        [s["tf_exact"] for r, s in zip(edited, rel, strict=True) if r.get("sr_tf_exact")]
    )
    out["er_em"] = mean([s["em"] for r, s in zip(edited, rel, strict=True) if r.get("sr_em")])
    loc_items = [it for it in items if it.uid in base["loc"]]
    if scorer.task == "seq-cls":
        labels = scorer.classify([it.loc_prompt for it in loc_items])  # type: ignore[misc]
        same = [y == base["loc"][it.uid]["label"] for it, y in zip(loc_items, labels, strict=True)]
        out["loc_tf"] = out["loc_em"] = mean(same)
    else:
        pairs = [(it.loc_prompt, str(it.loc_target)) for it in loc_items]
        forced = scorer.forced(pairs)  # type: ignore[arg-type]
        budgets = [scorer.answer_budget(p, t) for p, t in pairs]  # type: ignore[arg-type]
        texts = scorer.generate([p for p, _ in pairs], budgets)  # type: ignore[misc]
        out["loc_tf"] = mean(
            [
                agreement(f.predicted, base["loc"][it.uid]["pred"])
                for it, f in zip(loc_items, forced, strict=True)
            ]
        )
        out["loc_em"] = mean(
            [
                normalize_answer(first_line(g))
                == normalize_answer(first_line(base["loc"][it.uid]["text"]))
                for it, g in zip(loc_items, texts, strict=True)
            ]
        )
    for name, held in (("train", data.train_heldout), ("test", data.test_heldout)):
        scores = score_items(scorer, [(it.prompt, it.target) for it in held])
        for key in ("tf", "em"):
            out[f"{name}_{key}"] = mean([s[key] for s in scores])
            out[f"{name}r_{key}"] = ratio(out[f"{name}_{key}"], base[name][key])
    if general and "general" in base:
        g = base["general"]
        out["ppl"] = scorer.perplexity(g["texts"], g["prompts"])
        out["ppl_base"] = g["ppl"]
        out["ppl_ratio"] = out["ppl"] / g["ppl"]
    return out


# -- editors -----------------------------------------------------------------------------
def make_editor(
    method: str,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    data: TaskData,
    settings: BenchSettings,
    state_dir: Path | None = None,
) -> Editor:
    """Build a method's editor; for T-Patcher, from a saved patch when ``state_dir`` has one."""
    if method == "tpatcher":
        memory = {"memory_texts": data.memory_texts, "memory_source": data.memory_source}
        if state_dir is not None and (state_dir / "manifest.json").is_file():
            return TPatcherEditor(Patcher.load(model, tok, state_dir, **memory))
        return TPatcherEditor(Patcher(model, tok, settings.patcher_config(), **memory))
    if method not in BASELINES:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    module = importlib.import_module("tpatcher.evaluation.baselines")
    cls = getattr(module, BASELINES[method])
    return cls(
        model,
        tok,
        task=data.kind,
        locality_texts=data.memory_texts,
        **settings.method_settings.get(method, {}),
    )


def _safe_edit(editor: Editor, item: EditItem) -> EditOutcome:
    """An edit that raises (e.g. a too-long input) counts as a failed edit, not a crash."""
    start = time.perf_counter()
    try:
        return editor.edit(item.prompt, item.target)
    except Exception as exc:  # noqa: BLE001 - any method's failure is recorded, not fatal
        return EditOutcome(False, time.perf_counter() - start, {"error": repr(exc)})


def _save_state(editor: Editor, state_dir: Path) -> dict[str, Any]:
    """Checkpoint what the editor needs; returns extra fields for progress.json."""
    if isinstance(editor, TPatcherEditor):
        editor.patcher.save(state_dir)
        return {"patcher_counter": editor.patcher._counter}
    if hasattr(editor, "save_state"):
        editor.save_state(state_dir)  # type: ignore[attr-defined]
    return {}


def _restore(editor: Editor, state_dir: Path, progress: dict[str, Any], data: TaskData) -> None:
    """Bring a freshly built editor to the checkpoint in ``progress`` (see module docstring)."""
    records = progress["records"]
    if isinstance(editor, TPatcherEditor):
        patcher = editor.patcher
        keep = {r.get("edit_id") for r in records if r.get("edit_id")}
        for edit_id in [e.edit_id for e in patcher.edits if e.edit_id not in keep]:
            patcher.rollback(edit_id)  # saved after the last progress write
        patcher._counter = int(progress.get("patcher_counter", len(patcher.edits)))
        return
    if hasattr(editor, "load_state") and (state_dir.exists()):
        editor.load_state(state_dir)  # type: ignore[attr-defined]
        return
    by_uid = {it.uid: it for it in data.stream}
    for record in records:
        if record["edited"]:
            _safe_edit(editor, by_uid[record["uid"]])


# -- one method --------------------------------------------------------------------------
def run_method(
    method: str,
    settings: BenchSettings,
    data: TaskData,
    base: dict[str, Any],
    *,
    stop_after: int | None = None,
    on_item: ItemHook | None = None,
) -> dict[str, Any]:
    """Run (or resume) one method over the stream; returns its summary.

    ``stop_after`` processes at most that many stream items in this call, checkpoints and
    returns ``{"complete": False, ...}``: a deliberate interruption (tests, time limits).
    """
    folder = Path(settings.out_dir) / method
    final_path, progress_path, state_dir = (
        folder / "final.json",
        folder / "progress.json",
        folder / "state",
    )
    final = _read_json(final_path)
    if final and final.get("key") == settings.method_key(method):
        return final
    progress = _read_json(progress_path)
    key = settings.method_key(method)
    if not progress or progress.get("key") != key:  # a new run, or other settings: start over
        progress = {"key": key, "method": method, "records": [], "curve": []}
        shutil.rmtree(state_dir, ignore_errors=True)
    model, tok = load_base_model(settings, data.kind)
    editor = make_editor(method, model, tok, data, settings, state_dir)
    if progress["records"]:
        _restore(editor, state_dir, progress, data)
    scorer = _scorer(editor.model, tok, settings, data.kind)
    records: list[dict[str, Any]] = progress["records"]
    done_now = 0

    def checkpoint() -> None:
        progress.update(_save_state(editor, state_dir))
        _write_json(progress_path, progress)

    for index in range(len(records), len(data.stream)):
        if stop_after is not None and done_now >= stop_after:
            checkpoint()
            return {"method": method, "complete": False, "items_done": len(records)}
        item = data.stream[index]
        scorer.model = editor.model  # an editor may swap in a wrapped model
        record = _process(editor, scorer, item, index, data.mode)
        records.append(record)
        done_now += 1
        if on_item:
            on_item(method, index + 1, len(data.stream), record)
        if settings.eval_every and (index + 1) % settings.eval_every == 0:
            point = evaluate_state(scorer, data, base, records)
            progress["curve"].append(dict(point, items=index + 1))
        if (index + 1) % max(1, settings.checkpoint_every) == 0:
            checkpoint()
    checkpoint()
    scorer.model = editor.model
    curve = progress["curve"]
    if curve and curve[-1]["items"] == len(records):  # the last curve point is this state
        metrics = {k: v for k, v in curve[-1].items() if k != "items"}
    else:
        metrics = evaluate_state(scorer, data, base, records)
        curve.append(dict(metrics, items=len(records)))
    final = summarize(method, editor, records, metrics, curve, settings)
    _write_json(final_path, final)
    return final


def _process(
    editor: Editor, scorer: Scorer, item: EditItem, index: int, mode: str
) -> dict[str, Any]:
    """Check one stream item against the current model, edit it if due, score SR/GR."""
    record: dict[str, Any] = {"index": index, "uid": item.uid, "target": item.target}
    if mode == "mistakes":
        record["mistake"] = not _right(scorer, item)
    else:
        record["mistake"] = True
    record["edited"] = record["mistake"]
    if not record["edited"]:
        return record
    outcome = _safe_edit(editor, item)
    details = outcome.details
    record.update(
        success=bool(outcome.success),
        seconds=round(outcome.seconds, 3),
        edit_id=details.get("edit_id"),
        message=details.get("message") or details.get("error") or "",
    )
    pairs = [(item.prompt, item.target)]
    if item.paraphrase:
        pairs.append((item.paraphrase, item.target))
    scores = score_items(scorer, pairs)
    record.update(sr_tf=scores[0]["tf"], sr_tf_exact=scores[0]["tf_exact"], sr_em=scores[0]["em"])
    record["output"] = scores[0]["output"]
    if len(scores) > 1:
        record.update(gr_tf=scores[1]["tf"], gr_em=scores[1]["em"])
    return record


def _right(scorer: Scorer, item: EditItem) -> bool:
    """Whether the current model gets ``item`` right (teacher-forced, all tokens; or label)."""
    if scorer.task == "seq-cls":
        return scorer.classify([item.prompt])[0] == item.target
    return scorer.forced([(item.prompt, str(item.target))])[0].exact


def summarize(
    method: str,
    editor: Editor,
    records: list[dict[str, Any]],
    metrics: dict[str, Any],
    curve: list[dict[str, Any]],
    settings: BenchSettings,
) -> dict[str, Any]:
    """The per-method result: stream counts, mean SR/GR, final metrics, curve, settings."""
    edited = [r for r in records if r["edited"]]
    try:
        editor_settings = editor.settings()
    except Exception as exc:  # noqa: BLE001 - settings are informative only
        editor_settings = {"error": repr(exc)}
    summary = {
        "key": settings.method_key(method),
        "method": method,
        "complete": True,
        "device": settings.device,
        "items": len(records),
        "mistakes": sum(bool(r["mistake"]) for r in records),
        "edits": len(edited),
        "edit_success": mean([r["success"] for r in edited]),
        "seconds_per_edit": mean([r["seconds"] for r in edited]),
        "sr_tf": mean([r["sr_tf"] for r in edited]),
        "sr_em": mean([r["sr_em"] for r in edited]),
        "gr_tf": mean([r["gr_tf"] for r in edited if "gr_tf" in r]),
        "gr_em": mean([r["gr_em"] for r in edited if "gr_em" in r]),
    }
    summary.update(metrics)
    summary["curve"] = curve
    summary["records"] = records
    summary["settings"] = editor_settings
    return summary


# -- the whole benchmark -----------------------------------------------------------------
def run_benchmark(
    settings: BenchSettings,
    *,
    stop_after: int | None = None,
    on_item: ItemHook | None = None,
    on_status: Callable[[str], None] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Run every method of ``settings`` (resuming what ``out_dir`` holds) and write
    ``results.json`` and the plots. Returns the results."""
    for method in settings.methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    status = on_status or (lambda _msg: None)
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = load_task(
        settings.task,
        settings.data_dir,
        settings.edits,
        seed=settings.seed,
        mode=settings.mode,
        heldout=settings.heldout,
        memory_records=settings.memory_records,
    )
    base = _read_json(out / "base.json")
    if not base or base.get("key") != settings.key():
        status("evaluating the unedited model")
        model, tok = load_base_model(settings, data.kind)
        base = base_outputs(_scorer(model, tok, settings, data.kind), data, settings)
        _write_json(out / "base.json", base)
        del model
    results: dict[str, Any] = {
        "settings": asdict(settings),
        "task": {
            "task": data.task,
            "mode": data.mode,
            "kind": data.kind,
            "stream": len(data.stream),
            "train_heldout": len(data.train_heldout),
            "test_heldout": len(data.test_heldout),
            "memory_source": data.memory_source,
            "general_text": base.get("general", {}).get("source"),
            **data.notes,
        },
        "base": {k: base[k] for k in ("train", "test")},
        "methods": {},
        "complete": True,
    }
    if "general" in base:
        results["base"]["ppl"] = base["general"]["ppl"]
    for method in settings.methods:
        status(f"running {method}")
        summary = run_method(method, settings, data, base, stop_after=stop_after, on_item=on_item)
        results["methods"][method] = summary
        results["complete"] &= bool(summary.get("complete"))
    _write_json(out / "results.json", results)
    if plots:
        from .report import plot_results

        results["plots"] = [str(p) for p in plot_results(results, out)]
        _write_json(out / "results.json", results)
    return results
