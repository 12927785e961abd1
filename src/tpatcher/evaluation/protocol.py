"""The sequential model-editing protocol, final-model metrics, checkpoints and resume.

Paper protocol (Huang et al. 2023, SME): a seeded random stream; each item is checked against
the *current* model and edited only if it is a mistake (``mode="mistakes"``; teacher-forced:
any target token wrong, or the wrong label) or always (``mode="counterfactual"``). Right after
each edit: SR (the edit input is now right) and GR (its paraphrase is right). At the end: ER,
TrainR, TestR; the WISE/EasyEdit final-model metrics Rel, Gen, Loc over all edits, perplexity
on general text before and after; and the real-use metrics (free chat answers, bare
questions, unchanged general answers). See :func:`evaluate_state` for definitions.

Edits are made on the template prompt (``edit_format="template"``) or, as the service makes
them, on the question through the model's chat template (``"chat"``); every format is
measured either way.

Resume: each method keeps ``<out>/<method>/progress.json`` (per-item records, written
atomically after every ``checkpoint_every`` items). An editor with ``save_state(dir)`` /
``load_state(dir)`` (T-Patcher's saves its patch directory; WISE, MEMOIR and GRACE their side
memories or codebook) saves each checkpoint into a fresh folder ``state-<items>``;
progress.json names it only once it is written, and older folders are deleted only after
that, so the folder progress.json names always matches its records, whenever a crash comes.
Resuming loads that folder into a freshly built editor. Any other editor is rebuilt by
replaying its recorded edits in order on a fresh model (deterministic methods give the same
model; the per-edit SR/GR already recorded are kept).
A finished method (``final.json``) is not rerun.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..config import PatcherConfig
from ..encoding import has_chat_template, render_chat
from ..ffn_site import eval_mode
from ..patcher import Patcher
from ..subject_guess import guess_subject
from .data import BENCH_TASKS, ZSRE_FORMAT, EditItem, TaskData, load_task
from .editors import Editor, EditOutcome, TPatcherEditor
from .metrics import (
    Scorer,
    agreement,
    contains_answer,
    first_line,
    first_sentence,
    mean,
    normalize_answer,
    ratio,
)

#: Each method's editor as ``module:Class``, imported only when the method runs, so a
#: missing module fails only the methods that need it.
EDITORS = {
    "ft": "tpatcher.evaluation.baselines:FTEditor",
    "ftkl": "tpatcher.evaluation.baselines:FTKLEditor",
    "grace": "tpatcher.evaluation.grace:GraceEditor",
    "grace-tokens": "tpatcher.evaluation.baselines:GraceTokensEditor",
    "wise": "tpatcher.evaluation.wise:WiseEditor",
    "memoir": "tpatcher.evaluation.memoir:MemoirEditor",
}
METHODS = ("tpatcher", *EDITORS)
#: Where edits are made: the template prompt; the question through the chat template (as the
#: service edits); or ``joint``: the template prompt trained together with the chat turn and
#: the bare question (``Patcher.edit(..., also=...)``; T-Patcher only).
EDIT_FORMATS = ("template", "chat", "joint", "lead")
#: Which subject each T-Patcher edit is given: the record's ``subject`` field, the one
#: :func:`tpatcher.guess_subject` finds in its question (as the service does for a
#: correction that names none), or none.
SUBJECT_SOURCES = ("record", "guess", "none")
#: The real-use metrics :func:`evaluate_state` adds (``None`` where undefined).
REAL_USE_KEYS = ("rel_chat", "gen_chat", "loc_chat", "rel_q", "gen_q", "general_same")

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
GENERAL_QUESTIONS_SOURCE = (
    "greedy chat answers of the unedited model to tpatcher/evaluation/general_questions.txt"
)
GENERAL_TEMPLATE_SOURCE = (
    "greedy answers of the unedited model to tpatcher/evaluation/general_questions.txt, "
    "asked in the zsRE template (the model has no chat template)"
)

ItemHook = Callable[[str, int, int, dict[str, Any]], None]


def general_questions() -> list[str]:
    """The general-ability questions (everyday questions unlike every data set and memory
    text), one per line of ``general_questions.txt``."""
    text = resources.files(__package__).joinpath("general_questions.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def editor_class(method: str) -> type[Editor]:
    """The editor class of a method in :data:`EDITORS`, imported now."""
    if method not in EDITORS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    module_name, _, name = EDITORS[method].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise ValueError(f"method {method!r} needs {module_name}, which is missing") from exc
    return getattr(module, name)


def method_available(method: str) -> bool:
    """Whether a method's editor module is present (without importing it)."""
    if method == "tpatcher":
        return True
    if method not in EDITORS:
        return False
    return importlib.util.find_spec(EDITORS[method].partition(":")[0]) is not None


def _check_settings(method: str, given: dict[str, Any]) -> None:
    """Import a chosen method's editor (a missing module fails now) and refuse settings its
    settings dataclass does not have."""
    cls = getattr(editor_class(method), "settings_class", None)
    if given and isinstance(cls, type) and is_dataclass(cls):
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{method} has no setting(s) {', '.join(unknown)}")


@dataclass
class BenchSettings:
    """One benchmark run. ``patcher`` overrides :class:`PatcherConfig` fields; ``method_settings``
    passes keyword settings to each baseline's constructor. ``real_use`` adds the free-answer
    metrics (causal LMs; the chat ones need a chat template); ``edit_format`` is where edits
    are made: the template prompt or the question through the chat template."""

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
    real_use: bool = True
    edit_format: str = "template"
    general_questions: int = 200
    answer_tokens: int = 48
    subjects: str = "record"
    base_from: str | None = None  # a results directory whose base.json this run reuses

    def key(self) -> str:
        """Identifies the data and base evaluation; a resumed run must match it."""
        parts = [self.task, self.mode, self.edits, self.model, self.seed, self.heldout]
        parts += [self.memory_records, self.general_prompts, self.general_tokens, self.extra_tokens]
        parts += [str(Path(self.data_dir).resolve())]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def real_use_key(self) -> str:
        """Identifies the unedited model's real-use answers (kept apart from :meth:`key`, so
        turning them on does not redo a run's other base outputs)."""
        parts = [self.key(), self.general_questions, self.answer_tokens, "real-use-1"]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def patcher_config(self) -> PatcherConfig:
        """T-Patcher's config: the defaults, ``patcher``'s overrides and the run's seed."""
        return PatcherConfig.from_dict(dict(self.patcher, seed=self.seed))

    def validate(self) -> None:
        """Refuse bad settings before any work: a misspelt override must not surface hours
        later, or run the defaults."""
        if not self.methods:
            raise ValueError("no methods chosen")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; expected one of {', '.join(METHODS)}")
        if self.task not in BENCH_TASKS:
            raise ValueError(
                f"unknown task {self.task!r}; expected one of {', '.join(BENCH_TASKS)}"
            )
        if self.edit_format not in EDIT_FORMATS:
            raise ValueError(
                f"unknown edit format {self.edit_format!r}; expected one of "
                f"{', '.join(EDIT_FORMATS)}"
            )
        if self.subjects not in SUBJECT_SOURCES:
            raise ValueError(
                f"unknown subject source {self.subjects!r}; expected one of "
                f"{', '.join(SUBJECT_SOURCES)}"
            )
        if self.edit_format != "template" and self.task == "factcheck":
            raise ValueError("chat edits need a generation task (zsre, counterfact)")
        if self.edit_format in ("joint", "lead") and set(self.methods) != {"tpatcher"}:
            raise ValueError(
                f"edit_format {self.edit_format!r} trains several wordings at once: tpatcher only"
            )
        stray = sorted(set(self.method_settings) - set(EDITORS))
        if stray:
            raise ValueError(f"method_settings for {stray[0]!r}, which is not a baseline method")
        for method in self.methods:
            if method != "tpatcher":
                _check_settings(method, self.method_settings.get(method, {}))
        try:
            self.patcher_config()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"invalid T-Patcher settings (--patcher): {exc}") from exc
        if self.base_from is not None:
            self._check_base_from()

    def _check_base_from(self) -> None:
        """``base_from`` must hold the unedited outputs of this very stream and model."""
        path = Path(str(self.base_from)) / "base.json"
        base = _read_json(path)
        if not base:
            raise ValueError(f"--base-from {self.base_from}: no readable base.json there")
        if base.get("key") != self.key():
            raise ValueError(
                f"--base-from {self.base_from}: its base.json is of another stream or model "
                "(task, mode, edits, model, seed, held-out size, memory records, general "
                "prompts or data differ)"
            )

    def method_key(self, method: str) -> str:
        """The run key plus the method's own settings: changing them starts the method over.

        T-Patcher's are the whole resolved config, so a change of a default does too; a new
        setting at the value its absence meant does not (:meth:`PatcherConfig.key_fields`)."""
        own: dict[str, Any]
        if method == "tpatcher":
            own = self.patcher_config().key_fields()
        else:
            own = self.method_settings.get(method, {})
        parts: list[Any] = [self.key(), method, own]
        if self.edit_format != "template":  # keeps the keys of template runs as they were
            parts.append({"edit_format": self.edit_format})
        if self.subjects != "record" and method == "tpatcher":
            parts.append({"subjects": self.subjects})
        blob = json.dumps(parts, sort_keys=True, default=str)
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


def base_real_use(scorer: Scorer, data: TaskData, settings: BenchSettings) -> dict[str, Any]:
    """The unedited model's chat answers that the real-use locality metrics compare with: to
    each stream item's unrelated question and to the general questions. Without a chat
    template the general questions are asked in the zsRE template instead (a base model's
    way of being asked), and the chat metrics are undefined."""
    tok = scorer.tokenizer
    part: dict[str, Any] = {
        "key": settings.real_use_key(),
        "tokens": settings.answer_tokens,
        "chat": has_chat_template(tok),
    }
    questions = general_questions()[: settings.general_questions]
    if not part["chat"]:
        general = {"source": GENERAL_TEMPLATE_SOURCE, "template": ZSRE_FORMAT}
        general["questions"] = questions
        general["answers"] = scorer.answers(general_prompts(tok, general), settings.answer_tokens)
        part["general"] = general
        return part
    loc_items = [it for it in data.stream if it.loc_question]
    prompts = [render_chat(tok, str(it.loc_question)) for it in loc_items]
    prompts += [render_chat(tok, q) for q in questions]
    answers = scorer.answers(prompts, settings.answer_tokens)
    part["loc"] = {it.uid: a for it, a in zip(loc_items, answers[: len(loc_items)], strict=True)}
    part["general"] = {
        "source": GENERAL_QUESTIONS_SOURCE,
        "questions": questions,
        "answers": answers[len(loc_items) :],
    }
    return part


def general_prompts(tok: PreTrainedTokenizerBase, general: dict[str, Any]) -> list[str]:
    """The general questions as the bench asks them: chat turns, or in ``general["template"]``
    where the model has no chat template (the one rule for the base, the metric and the
    diagnosis script)."""
    template = general.get("template")
    return [template.format(q=q) if template else render_chat(tok, q) for q in general["questions"]]


def same_answer(now: str, before: str) -> bool:
    """Whether two free answers say the same: their normalised first sentences are equal."""
    return normalize_answer(first_sentence(now)) == normalize_answer(first_sentence(before))


def real_use_metrics(
    scorer: Scorer, items: list[EditItem], real: dict[str, Any]
) -> dict[str, float | None]:
    """The real-use metrics of the model now over the edited ``items`` (see
    :func:`evaluate_state`); all prompts go to the model in one batched call."""
    tok = scorer.tokenizer
    groups: dict[str, list[tuple[str, str | None]]] = {
        "rel_q": [(str(it.question), str(it.target)) for it in items if it.question],
        "gen_q": [
            (str(it.paraphrase_question), str(it.target)) for it in items if it.paraphrase_question
        ],
    }
    loc_items = [it for it in items if it.uid in real.get("loc", {})]
    if real.get("chat"):
        groups["rel_chat"] = [(render_chat(tok, p), t) for p, t in groups["rel_q"]]
        groups["gen_chat"] = [(render_chat(tok, p), t) for p, t in groups["gen_q"]]
        groups["loc_chat"] = [
            (render_chat(tok, str(it.loc_question)), real["loc"][it.uid]) for it in loc_items
        ]
    general = real.get("general")
    if general:  # chat turns, or the template a model without a chat template was asked in
        asked = general_prompts(tok, general)
        groups["general_same"] = list(zip(asked, general["answers"], strict=True))
    flat = [prompt for pairs in groups.values() for prompt, _ in pairs]
    answers = iter(scorer.answers(flat, int(real["tokens"])))
    out: dict[str, float | None] = dict.fromkeys(REAL_USE_KEYS)
    for name, pairs in groups.items():
        judge = same_answer if name in ("loc_chat", "general_same") else contains_answer
        out[name] = mean([judge(next(answers), str(want)) for _, want in pairs])
    return out


def _sample(scorer: Scorer, prompts: list[str], tokens: int, seed: int) -> list[str]:
    """Prompt + sampled continuation, one prompt at a time (no padding to perturb sampling)."""
    torch.manual_seed(seed)
    texts = []
    tok = scorer.tokenizer
    for prompt in prompts:
        enc = tok(prompt, return_tensors="pt").to(scorer.device)
        with eval_mode(scorer.model), torch.no_grad():
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


def locality(scorer: Scorer, items: list[EditItem], base: dict[str, Any]) -> dict[str, Any]:
    """``loc_tf`` and ``loc_em`` of the model now over ``items`` (see :func:`evaluate_state`)."""
    loc_items = [it for it in items if it.uid in base["loc"]]
    before = [base["loc"][it.uid] for it in loc_items]
    if scorer.task == "seq-cls":
        labels = scorer.classify([str(it.loc_prompt) for it in loc_items])
        same = mean([y == b["label"] for y, b in zip(labels, before, strict=True)])
        return {"loc_tf": same, "loc_em": same}
    pairs = [(str(it.loc_prompt), str(it.loc_target)) for it in loc_items]
    forced = scorer.forced(pairs)
    budgets = [scorer.answer_budget(p, t) for p, t in pairs]
    texts = scorer.generate([p for p, _ in pairs], budgets)
    return {
        "loc_tf": mean(
            [agreement(f.predicted, b["pred"]) for f, b in zip(forced, before, strict=True)]
        ),
        "loc_em": mean(
            [
                normalize_answer(first_line(g)) == normalize_answer(first_line(b["text"]))
                for g, b in zip(texts, before, strict=True)
            ]
        ),
    }


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

    Real use (when ``base`` has the unedited model's real-use answers; free greedy answers
    of up to ``answer_tokens`` tokens, cut at the end of the turn or first sentence):

    * ``rel_chat``/``gen_chat``: the edit's question (its paraphrase) as one user turn of the
      chat template; right when the normalised target appears, as whole words, in the
      answer's first sentence. ``rel_q``/``gen_q``: the same for the bare question as text.
    * ``loc_chat``: share of the unrelated questions whose chat answer's first sentence is
      unchanged (normalised) from the unedited model's; ``general_same``: the same over
      the general questions. Without a chat template the chat metrics are ``None`` and the
      general questions are asked in the zsRE template.
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
    out.update(locality(scorer, items, base))
    for name, held in (("train", data.train_heldout), ("test", data.test_heldout)):
        scores = score_items(scorer, [(it.prompt, it.target) for it in held])
        for key in ("tf", "em"):
            out[f"{name}_{key}"] = mean([s[key] for s in scores])
            out[f"{name}r_{key}"] = ratio(out[f"{name}_{key}"], base[name][key])
    if "real_use" in base and scorer.task == "causal-lm":
        out.update(real_use_metrics(scorer, items, base["real_use"]))
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
) -> Editor:
    """A method's editor on a fresh model (a checkpoint is loaded into it afterwards)."""
    if method == "tpatcher":
        memory = {"memory_texts": data.memory_texts, "memory_source": data.memory_source}
        return TPatcherEditor(Patcher(model, tok, settings.patcher_config(), **memory))
    cls = editor_class(method)
    return cls(  # type: ignore[call-arg]
        model,
        tok,
        task=data.kind,
        locality_texts=data.memory_texts,
        **settings.method_settings.get(method, {}),
    )


def edit_prompts(
    item: EditItem, edit_format: str, tok: PreTrainedTokenizerBase
) -> tuple[str, str | None]:
    """The edit prompt and its paraphrase in the run's edit format: the template prompts, or
    the raw questions through the chat template (as the service edits)."""
    if edit_format == "chat" and item.question:
        para = item.paraphrase_question
        return render_chat(tok, item.question), render_chat(tok, para) if para else None
    return item.prompt, item.paraphrase


def other_wordings(item: EditItem, edit_format: str, tok: PreTrainedTokenizerBase) -> list[str]:
    """The wordings trained with the edit prompt in the ``joint`` and ``lead`` formats: the
    question as a chat turn (where the model has a chat template) and as bare text."""
    if edit_format not in ("joint", "lead") or not item.question or item.question == item.prompt:
        return []
    forms = [render_chat(tok, item.question)] if has_chat_template(tok) else []
    return [*forms, item.question]


def edit_subject(item: EditItem, source: str) -> str | None:
    """The subject an edit of ``item`` is given (see :data:`SUBJECT_SOURCES`)."""
    if source == "guess":
        return guess_subject(str(item.question or item.prompt))
    return item.subject if source == "record" else None


def _safe_edit(
    editor: Editor,
    prompt: str,
    target: str | int,
    also: list[str] | None = None,
    subject: str | None = None,
) -> EditOutcome:
    """An edit that raises (e.g. a too-long input) counts as a failed edit, not a crash.
    ``also`` and ``subject`` reach T-Patcher only (no baseline takes them)."""
    start = time.perf_counter()
    try:
        if isinstance(editor, TPatcherEditor):
            return editor.edit(prompt, target, also=also or (), subject=subject)
        return editor.edit(prompt, target)
    except Exception as exc:  # noqa: BLE001 - any method's failure is recorded, not fatal
        return EditOutcome(False, time.perf_counter() - start, {"error": repr(exc)})


def _saves_state(editor: Editor) -> bool:
    return callable(getattr(editor, "save_state", None)) and callable(
        getattr(editor, "load_state", None)
    )


def _checkpoint(editor: Editor, folder: Path, progress: dict[str, Any]) -> None:
    """State into a fresh ``state-<items>`` folder, then progress.json naming it, then the
    older folders deleted: a crash anywhere leaves progress.json naming a whole state that
    matches its records."""
    name = f"state-{len(progress['records'])}"
    if _saves_state(editor) and progress.get("state") != name:
        target = folder / name
        shutil.rmtree(target, ignore_errors=True)  # left by a crash before its progress write
        editor.save_state(target)  # type: ignore[attr-defined]
        progress["state"] = name
    _write_json(folder / "progress.json", progress)
    _remove_states(folder, keep=progress.get("state"))


def _remove_states(folder: Path, keep: str | None = None) -> None:
    """Delete every state folder but ``keep`` (``state`` is the old single-folder layout)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_dir() and path.name.startswith("state") and path.name != keep:
            shutil.rmtree(path, ignore_errors=True)


def _restore(
    editor: Editor, folder: Path, progress: dict[str, Any], data: TaskData, edit_format: str
) -> None:
    """Bring a freshly built editor to the checkpoint in ``progress`` (see module docstring)."""
    state = progress.get("state")
    if state and _saves_state(editor) and (folder / state).is_dir():
        editor.load_state(folder / state)  # type: ignore[attr-defined]
        return
    by_uid = {it.uid: it for it in data.stream}
    for record in progress["records"]:
        if record["edited"]:
            item = by_uid[record["uid"]]
            prompt = edit_prompts(item, edit_format, editor.tokenizer)[0]
            also = other_wordings(item, edit_format, editor.tokenizer)
            _safe_edit(editor, prompt, item.target, also, item.subject)


# -- one method --------------------------------------------------------------------------
def _start(method: str, settings: BenchSettings, folder: Path) -> dict[str, Any]:
    """The method's progress to continue from, or a fresh one (other settings start over)."""
    progress = _read_json(folder / "progress.json")
    key = settings.method_key(method)
    if not progress or progress.get("key") != key:
        progress = {"key": key, "method": method, "records": [], "curve": []}
        _remove_states(folder)
    return progress


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
    final = _read_json(folder / "final.json")
    if final and final.get("key") == settings.method_key(method):
        return final
    progress = _start(method, settings, folder)
    model, tok = load_base_model(settings, data.kind)
    if settings.edit_format == "chat" and not has_chat_template(tok):
        raise ValueError("edit_format 'chat' needs a model with a chat template")
    editor = make_editor(method, model, tok, data, settings)
    if progress["records"]:
        _restore(editor, folder, progress, data, settings.edit_format)
    scorer = _scorer(editor.model, tok, settings, data.kind)
    records: list[dict[str, Any]] = progress["records"]
    done_now = 0
    for index in range(len(records), len(data.stream)):
        if stop_after is not None and done_now >= stop_after:
            _checkpoint(editor, folder, progress)
            return {"method": method, "complete": False, "items_done": len(records)}
        scorer.model = editor.model  # an editor may swap in a wrapped model
        record = _process(editor, scorer, data.stream[index], index, data.mode, settings)
        records.append(record)
        done_now += 1
        if on_item:
            on_item(method, index + 1, len(data.stream), record)
        if settings.eval_every and (index + 1) % settings.eval_every == 0:
            point = evaluate_state(scorer, data, base, records)
            progress["curve"].append(dict(point, items=index + 1))
        if (index + 1) % max(1, settings.checkpoint_every) == 0:
            _checkpoint(editor, folder, progress)
    _checkpoint(editor, folder, progress)
    scorer.model = editor.model
    curve = progress["curve"]
    if curve and curve[-1]["items"] == len(records):  # the last curve point is this state
        metrics = {k: v for k, v in curve[-1].items() if k != "items"}
    else:
        metrics = evaluate_state(scorer, data, base, records)
        curve.append(dict(metrics, items=len(records)))
    final = summarize(method, editor, records, metrics, curve, settings)
    _write_json(folder / "final.json", final)
    return final


def _process(
    editor: Editor,
    scorer: Scorer,
    item: EditItem,
    index: int,
    mode: str,
    settings: BenchSettings,
) -> dict[str, Any]:
    """Check one stream item against the current model, edit it if due, score SR/GR (in the
    run's edit format)."""
    prompt, paraphrase = edit_prompts(item, settings.edit_format, scorer.tokenizer)
    record: dict[str, Any] = {"index": index, "uid": item.uid, "target": item.target}
    if mode == "mistakes":
        record["mistake"] = not _right(scorer, prompt, item.target)
    else:
        record["mistake"] = True
    record["edited"] = record["mistake"]
    if not record["edited"]:
        return record
    also = other_wordings(item, settings.edit_format, scorer.tokenizer)
    if settings.edit_format == "lead" and also and isinstance(editor, TPatcherEditor):
        lead = editor.patcher.answer_lead(str(item.question), str(item.target))
        also += [lead] if lead else []
    outcome = _safe_edit(editor, prompt, item.target, also, edit_subject(item, settings.subjects))
    details = outcome.details
    record.update(
        success=bool(outcome.success),
        seconds=round(outcome.seconds, 3),
        edit_id=details.get("edit_id"),
        message=details.get("message") or details.get("error") or "",
        **edit_counts(details),
    )
    pairs = [(prompt, item.target)]
    if paraphrase:
        pairs.append((paraphrase, item.target))
    scores = score_items(scorer, pairs)
    record.update(sr_tf=scores[0]["tf"], sr_tf_exact=scores[0]["tf_exact"], sr_em=scores[0]["em"])
    record["output"] = scores[0]["output"]
    if len(scores) > 1:
        record.update(gr_tf=scores[1]["tf"], gr_em=scores[1]["em"])
    return record


def edit_counts(details: dict[str, Any]) -> dict[str, int]:
    """What an edit's record keeps of its details beyond success: its steps and neurons,
    and the T-Patcher counts of memory inputs mined and neurons dropped where it made them
    (so a run says how often mining or ``drop_idle_neurons`` acted)."""
    counts = {k: int(details[k]) for k in ("steps", "neurons") if isinstance(details.get(k), int)}
    losses = details.get("losses")
    if isinstance(losses, dict):
        counts |= {k: int(losses[k]) for k in ("mined", "dropped") if k in losses}
    return counts


def _right(scorer: Scorer, prompt: str, target: str | int) -> bool:
    """Whether the current model gets ``prompt`` right (teacher-forced, all tokens; or label)."""
    if scorer.task == "seq-cls":
        return scorer.classify([prompt])[0] == target
    return scorer.forced([(prompt, str(target))])[0].exact


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
def _base(settings: BenchSettings, data: TaskData, status: Callable[[str], None]) -> dict:
    """``base.json``: the unedited model's outputs, computed where missing or stale (the
    real-use part on its own key). Without ``real_use`` that part is left out here."""
    path = Path(settings.out_dir) / "base.json"
    base = _read_json(path)
    need_base = not base or base.get("key") != settings.key()
    if need_base and settings.base_from is not None:  # its key was checked by validate()
        status(f"reusing the unedited model's outputs in {settings.base_from}")
        base, need_base = _read_json(Path(settings.base_from) / "base.json"), False
        _write_json(path, base)
    real_use = settings.real_use and data.kind == "causal-lm"
    real = (base or {}).get("real_use") or {}
    need_real = real_use and (
        need_base
        or real.get("key") != settings.real_use_key()
        or not (real.get("chat") or real.get("general"))  # from before template questions
    )
    if need_base or need_real:
        status("evaluating the unedited model")
        model, tok = load_base_model(settings, data.kind)
        scorer = _scorer(model, tok, settings, data.kind)
        if need_base:
            base = base_outputs(scorer, data, settings)
        if need_real:
            base["real_use"] = base_real_use(scorer, data, settings)
        _write_json(path, base)
        del model, scorer
    if not real_use:
        base = {k: v for k, v in base.items() if k != "real_use"}
    return base


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
    settings.validate()
    status = on_status or (lambda _msg: None)
    out = Path(settings.out_dir)
    data = load_task(
        settings.task,
        settings.data_dir,
        settings.edits,
        seed=settings.seed,
        mode=settings.mode,
        heldout=settings.heldout,
        memory_records=settings.memory_records,
    )
    out.mkdir(parents=True, exist_ok=True)
    base = _base(settings, data, status)
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
            "general_questions": (base.get("real_use") or {}).get("general", {}).get("source"),
            "edit_format": settings.edit_format,
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
