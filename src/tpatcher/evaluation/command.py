"""``tpatcher bench``: the benchmark as a typer command (registered by ``tpatcher.cli``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import json_object, patcher_overrides
from .protocol import METHODS, BenchSettings, run_benchmark
from .report import results_table

EDIT_FORMAT_HELP = (
    "template, chat (the question through the chat template), joint (the template prompt "
    "trained with the chat turn and the bare question) or lead (joint plus the model's own "
    "chat answer up to where the answer is due); the last two tpatcher only"
)


def _json_option(text: str, name: str) -> dict[str, Any]:
    """A JSON object given on the command line, refused clearly when it is not one."""
    try:
        return json_object(text, name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _patcher_option(text: str) -> dict[str, Any]:
    """``--patcher``: JSON ``PatcherConfig`` overrides, or ``paper`` for the paper's form."""
    try:
        return patcher_overrides(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


#: The options of ``tpatcher bench`` whose help does not fit beside their name.
_Methods = Annotated[str, typer.Option(help="comma-separated: " + ",".join(METHODS))]
_Model = Annotated[str, typer.Option(help="embedded model name or local folder")]
_Data = Annotated[Path, typer.Option(help="the data directory (see its README.md)")]
_Out = Annotated[Path, typer.Option(help="results directory; rerun to resume")]
_Mode = Annotated[
    str | None,
    typer.Option(help="mistakes (edit only what the model gets wrong) or counterfactual"),
]
_Heldout = Annotated[int, typer.Option(help="size of each held-out set (TrainR, TestR)")]
_GeneralPrompts = Annotated[
    int, typer.Option(help="prompts whose sampled text measures perplexity (max 16)")
]
_EvalEvery = Annotated[
    int, typer.Option(help="full evaluation every K items for the plots (0: only at the end)")
]
_PatcherSettings = Annotated[
    str,
    typer.Option(
        help="JSON PatcherConfig overrides, e.g. '{\"max_steps\": 500}', "
        "or 'paper' for the paper's form"
    ),
]
_MethodSettings = Annotated[
    str, typer.Option(help='JSON settings per baseline, e.g. \'{"ft": {"lr": 1e-4}}\'')
]
_Threads = Annotated[
    int, typer.Option(help="torch CPU threads (0: torch's default); 1 is fastest on a busy CPU")
]
_StopAfter = Annotated[
    int | None, typer.Option(help="process at most this many items per method, then stop")
]
_RealUse = Annotated[
    bool, typer.Option(help="free-answer metrics: chat, bare question, unchanged general answers")
]
_GeneralQuestions = Annotated[
    int, typer.Option(help="general questions whose chat answers must not change (max 200)")
]
_Subjects = Annotated[
    str,
    typer.Option(
        help="the subject each T-Patcher edit gets: record (the data's), guess (found in "
        "the question, as the service does) or none"
    ),
]

_BaseFrom = Annotated[
    Path | None,
    typer.Option(
        help="an earlier results directory of the same stream and model whose unedited "
        "outputs (base.json) this run reuses, as for another edit format or setting"
    ),
]


def bench(
    task: Annotated[str, typer.Option(help="zsre, counterfact or factcheck")] = "zsre",
    methods: _Methods = "tpatcher",
    edits: Annotated[int, typer.Option(help="length T of the edit stream")] = 20,
    model: _Model = "smollm2-135m",
    data: _Data = Path("../shared/data"),
    seed: Annotated[int, typer.Option(help="seeds the stream order and the methods")] = 0,
    out: _Out = Path("bench-out"),
    mode: _Mode = None,
    heldout: _Heldout = 100,
    memory_records: Annotated[int, typer.Option(help="records turned into memory texts")] = 1000,
    general_prompts: _GeneralPrompts = 16,
    general_tokens: Annotated[int, typer.Option(help="tokens sampled per general prompt")] = 48,
    checkpoint_every: Annotated[int, typer.Option(help="checkpoint after every K items")] = 10,
    eval_every: _EvalEvery = 0,
    patcher: _PatcherSettings = "{}",
    method_settings: _MethodSettings = "{}",
    threads: _Threads = 0,
    stop_after: _StopAfter = None,
    real_use: _RealUse = True,
    edit_format: Annotated[str, typer.Option(help=EDIT_FORMAT_HELP)] = "template",
    general_questions: _GeneralQuestions = 200,
    subjects: _Subjects = "record",
    base_from: _BaseFrom = None,
) -> None:
    """Run the sequential model-editing benchmark and print every metric per method."""
    settings = BenchSettings(
        task=task,
        methods=[m.strip() for m in methods.split(",") if m.strip()],
        edits=edits,
        data_dir=str(data),
        out_dir=str(out),
        model=model,
        seed=seed,
        mode=mode,
        heldout=heldout,
        memory_records=memory_records,
        general_prompts=general_prompts,
        general_tokens=general_tokens,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        patcher=_patcher_option(patcher),
        method_settings=_json_option(method_settings, "--method-settings"),
        real_use=real_use,
        edit_format=edit_format,
        general_questions=general_questions,
        subjects=subjects,
        base_from=None if base_from is None else str(base_from),
    )
    _run(settings, stop_after, threads)


def _run(settings: BenchSettings, stop_after: int | None, threads: int) -> None:
    """The benchmark with a progress bar per method, then the results table."""
    try:
        settings.validate()  # before any work: a misspelt setting fails at once
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if threads > 0:
        torch.set_num_threads(threads)
    console = Console()
    start = time.perf_counter()
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars: dict[str, Any] = {}

        def on_item(method: str, done: int, total: int, record: dict[str, Any]) -> None:
            if method not in bars:
                bars[method] = progress.add_task(method, total=total, info="")
            info = (
                "skipped (right)"
                if not record["edited"]
                else (
                    f"edit {'ok' if record.get('success') else 'FAILED'} "
                    f"SR={record.get('sr_tf', 0):.2f} GR={record.get('gr_tf', 0):.2f}"
                )
            )
            progress.update(bars[method], completed=done, info=info)

        results = run_benchmark(
            settings, stop_after=stop_after, on_item=on_item, on_status=console.log
        )
    console.print(results_table(results))
    elapsed = time.perf_counter() - start
    console.print(f"results: {Path(settings.out_dir) / 'results.json'} ({elapsed:.0f} s)")
    if not results["complete"]:
        console.print("[yellow]stopped early; rerun the same command to resume[/yellow]")
