"""The ``tpatcher`` command: demo, edit, generate, info, bench, export and serve."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .config import PatcherConfig, neuron_activation_from_word, patcher_overrides, settings_for
from .errors import TPatcherError

app = typer.Typer(
    help="Fix a transformer's mistakes one at a time by adding neurons to its last FFN.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console()

ModelOption = Annotated[
    str, typer.Option("--model", "-m", help="Embedded model name or local Hugging Face folder")
]
PatchDir = Annotated[Path, typer.Argument(help="Patch directory (manifest.json + edits/)")]


def _fail(error: Exception) -> typer.Exit:
    console.print(f"[bold red]error:[/] {error}")
    return typer.Exit(code=2)


NeuronActivationOption = Annotated[
    str,
    typer.Option(
        help="Activation of new neurons: 'auto' (ReLU on SiLU FFNs, else the FFN's own), "
        "'ffn' (the FFN's own: the paper's form, mergeable) or an activation name; "
        "an existing patch directory keeps its own"
    ),
]


PatcherOption = Annotated[
    str,
    typer.Option(
        "--patcher",
        help="JSON PatcherConfig settings for a new patch directory, e.g. "
        "'{\"subject_negatives\": 24}', or 'paper'; a saved one keeps its own and refuses "
        "different ones",
    ),
]
ChatOption = Annotated[
    bool,
    typer.Option(help="Put the prompt as one user turn of the model's chat template"),
]


def _settings(
    patch_dir: Path | None, patcher: str, neuron_activation: str
) -> tuple[dict | None, PatcherConfig]:
    """The saved manifest (None for a new directory) and the settings new edits train with,
    checked before the slow model load (:func:`tpatcher.config.settings_for`)."""
    from . import persistence

    overrides = patcher_overrides(patcher)
    if neuron_activation != "auto":
        overrides["neuron_activation"] = neuron_activation_from_word(neuron_activation)
    manifest = None
    if patch_dir is not None and (patch_dir / persistence.MANIFEST).exists():
        manifest = persistence.read_manifest(patch_dir)
    hint = "edit it without those settings, or start a new patch directory"
    return manifest, settings_for(manifest, overrides, f"patch directory {patch_dir}", hint)


def _load(
    model_name: str,
    patch_dir: Path | None,
    memory_file: Path | None = None,
    neuron_activation: str = "auto",
    patcher: str = "{}",
):
    from .models import load_model
    from .patcher import Patcher

    try:
        manifest, config = _settings(patch_dir, patcher, neuron_activation)
    except (TypeError, ValueError) as error:  # a bad setting, or not the saved patch's
        raise TPatcherError(str(error)) from error
    memory = None
    if memory_file is not None:
        memory = [line for line in memory_file.read_text("utf-8").splitlines() if line.strip()]
    with console.status(f"loading {model_name}"):
        model, tokenizer = load_model(model_name)
    if manifest is not None:
        return Patcher.load(model, tokenizer, patch_dir, config=config, memory_texts=memory)
    return Patcher(model, tokenizer, config, memory_texts=memory)


@app.command()
def edit(
    patch_dir: PatchDir,
    prompt: Annotated[str, typer.Option(help="The input the model gets wrong")],
    target: Annotated[str, typer.Option(help="The correct output (or label for a classifier)")],
    model: ModelOption = "smollm2-135m",
    memory_file: Annotated[
        Path | None, typer.Option(help="Memory texts, one per line (default: built-in bank)")
    ] = None,
    neuron_activation: NeuronActivationOption = "auto",
    subject: Annotated[
        str | None,
        typer.Option(help="What the edit is about, as the prompt names it (recorded with it)"),
    ] = None,
    guess_subject: Annotated[
        bool, typer.Option(help="Without --subject: take the longest name the prompt holds")
    ] = False,
    patcher_settings: PatcherOption = "{}",
    chat: ChatOption = False,
    also: Annotated[
        list[str] | None,
        typer.Option(
            "--also", help="Another wording (raw text) that must give the target; repeatable"
        ),
    ] = None,
    lead: Annotated[
        bool,
        typer.Option(
            help="With --chat: also train the bare question and the model's own answer up to "
            "where it names the answer, as the service's wordings 'auto'"
        ),
    ] = False,
) -> None:
    """Add one edit to a patch directory (created if missing); with --chat, the prompt is
    a question edited as the model's chat users (and ``tpatcher serve``) ask it."""
    wordings = _check_wordings(also or [], lead, chat)
    if guess_subject and subject is None:
        from .subject_guess import guess_subject as guess

        subject = guess(prompt)
        console.print(f"subject: {subject!r}" if subject else "no subject found in the prompt")
    try:
        patcher = _load(model, patch_dir, memory_file, neuron_activation, patcher_settings)
        label = int(target) if patcher.task == "seq-cls" and target.isdigit() else None
        if label is not None and wordings:
            raise TPatcherError("--also and --lead are for generative models, not classifiers")
        with console.status("training the patch"):
            if lead:
                from .wordings import chat_wordings

                wordings += chat_wordings(patcher, prompt, target)
            if chat:
                prompt = patcher.chat_prompt(prompt)
            if label is not None:
                result = patcher.edit(prompt, label=label, subject=subject)
            else:
                result = patcher.edit(prompt, target, subject=subject, also=wordings)
        if result.success and not result.already_correct:
            patcher.save(patch_dir)
    except (TPatcherError, OSError) as error:
        raise _fail(error) from error
    if result.already_correct:
        console.print("The model already gets this right; nothing changed.")
    elif result.success:
        console.print(
            f"edit [bold]{result.edit_id}[/] added: {result.neurons} neuron(s), "
            f"{result.steps} steps, {result.seconds:.2f} s; saved to {patch_dir}"
        )
    else:
        console.print(f"[yellow]edit failed:[/] {result.message}; {patch_dir} unchanged")
        raise typer.Exit(code=1)


def _check_wordings(also: list[str], lead: bool, chat: bool) -> list[str]:
    """``--also`` wordings, refused before the model loads when blank or when ``--lead`` is
    given without ``--chat`` (the lead is the model's chat answer)."""
    if lead and not chat:
        raise _fail(TPatcherError("--lead needs --chat: the lead is the model's chat answer"))
    if any(not text.strip() for text in also):
        raise _fail(TPatcherError("an --also wording is blank"))
    return list(also)


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue")],
    patch_dir: Annotated[Path | None, typer.Option(help="Patch directory to apply")] = None,
    model: ModelOption = "smollm2-135m",
    max_new_tokens: Annotated[int, typer.Option(min=1, max=2048)] = 32,
    chat: ChatOption = False,
) -> None:
    """Answer a prompt with a patch directory loaded (greedy decoding)."""
    try:
        patcher = _load(model, patch_dir)
        if patcher.task == "seq-cls":
            console.print(str(patcher.classify(prompt)))
        else:
            text = patcher.chat_prompt(prompt) if chat else prompt
            console.print(patcher.generate(text, max_new_tokens), markup=False)
    except (TPatcherError, OSError) as error:
        raise _fail(error) from error


@app.command()
def info(patch_dir: PatchDir) -> None:
    """List a patch directory's edits and the base model it belongs to."""
    from .persistence import read_manifest

    try:
        manifest = read_manifest(patch_dir)
    except TPatcherError as error:
        raise _fail(error) from error
    console.print(
        f"base model: [bold]{manifest.get('base_model')}[/] "
        f"(fingerprint {str(manifest.get('fingerprint'))[:12]}, "
        f"patched {manifest.get('patched_module')}, "
        f"neurons {manifest.get('activation', 'with the FFN activation')})"
    )
    table = Table("id", "created", "neurons", "prompt", "target")
    for entry in manifest["edits"]:
        target = entry.get("target") if entry.get("target") is not None else entry.get("label")
        table.add_row(
            entry["id"],
            str(entry.get("created", "")),
            str(entry.get("neurons", "")),
            str(entry.get("prompt", "")),
            str(target),
        )
    console.print(table)
    console.print(f"{len(manifest['edits'])} edit(s)")


class _DemoAsker:
    """How the demo asks a question and judges the answer: through the chat template with the
    free answer's first sentence (chat models, as their users ask), or the plain
    "Question: ...\nAnswer:" template with the answer's start."""

    def __init__(self, patcher, form: str, lead: bool = False) -> None:
        from .encoding import has_chat_template

        if form == "auto":
            form = "chat" if has_chat_template(patcher.tokenizer) else "template"
        if form == "chat" and not has_chat_template(patcher.tokenizer):
            raise TPatcherError("--format chat: this model has no chat template")
        self.patcher, self.form, self.lead = patcher, form, lead
        self.tokens = 48 if form == "chat" else 12

    def prompt(self, question: str) -> str:
        from .demo_facts import question_prompt

        return (
            self.patcher.chat_prompt(question) if self.form == "chat" else question_prompt(question)
        )

    def ask(self, question: str) -> str:
        return self.patcher.generate(self.prompt(question), self.tokens)

    def wordings(self, question: str, answer: str) -> list[str]:
        """With ``--lead``, other wordings trained with a chat edit: the bare question and the
        model's own answer up to where it names one (:meth:`tpatcher.Patcher.answer_lead`)."""
        if self.form != "chat" or not self.lead:
            return []
        from .wordings import chat_wordings

        return chat_wordings(self.patcher, question, answer, self.tokens)

    def shown(self, text: str) -> str:
        from .answers import first_sentence

        line = first_sentence(text) if self.form == "chat" else _first_line(text)
        return line.strip() or "(nothing)"

    def answered(self, answer: str, text: str) -> bool:
        from .answers import contains_answer

        return contains_answer(text, answer) if self.form == "chat" else _answered(answer, text)

    def is_mistake(self, question: str, answer: str) -> bool:
        judge = "answer" if self.form == "chat" else "tokens"
        return self.patcher.is_mistake(self.prompt(question), answer, judge=judge)


@app.command()
def demo(
    model: ModelOption = "smollm2-135m",
    save_to: Annotated[Path | None, typer.Option(help="Also save the patch here")] = None,
    limit: Annotated[int, typer.Option(help="Patch at most this many mistakes")] = 8,
    neuron_activation: NeuronActivationOption = "auto",
    form: Annotated[
        str,
        typer.Option(
            "--format",
            help="How questions are asked: 'chat' (the model's chat template, the free "
            "answer's first sentence judged), 'template' (Question: ...\nAnswer:) or 'auto' "
            "(chat where the model has a chat template)",
        ),
    ] = "auto",
    lead: Annotated[
        bool,
        typer.Option(
            help="Chat edits also train the bare question and the model's own answer up to "
            "where it names one (reaches more paraphrases; may touch similar questions)"
        ),
    ] = False,
) -> None:
    """Find facts the model gets wrong, patch them one by one, and show before and after."""
    from .demo_facts import CONTROL_QUESTIONS, FACTS

    logging.getLogger("transformers").setLevel(logging.ERROR)
    if form not in ("auto", "chat", "template"):
        raise _fail(TPatcherError(f"--format must be auto, chat or template, not {form!r}"))
    try:
        patcher, form = _demo_patcher(model, form, neuron_activation)
        if patcher.task == "seq-cls":
            raise TPatcherError("the demo needs a generative model")
        asker = _DemoAsker(patcher, form, lead)
        console.print(f"asking through the {asker.form} format")
        console.print(f"memory bank: building or loading ({patcher.config.memory_size} vectors)")
        with console.status("memory bank"):
            source = patcher.memory.source
        console.print(f"memory bank: {len(patcher.memory)} vectors from {source}")
        controls = {q: asker.ask(q) for q in CONTROL_QUESTIONS}
        rows = []
        with Progress(console=console) as progress:
            task = progress.add_task("checking and patching facts", total=len(FACTS))
            for fact in FACTS:
                if len(rows) >= limit or not asker.is_mistake(fact.question, fact.answer):
                    progress.advance(task)
                    continue
                before = asker.ask(fact.question)
                also = asker.wordings(fact.question, fact.answer)
                result = patcher.edit(asker.prompt(fact.question), fact.answer, also=also)
                after = asker.ask(fact.question)
                rows.append((fact, before, after, asker.ask(fact.paraphrase), result))
                progress.advance(task)
    except (TPatcherError, OSError) as error:
        raise _fail(error) from error
    _print_demo(rows, asker, controls)
    if save_to is not None:
        patcher.save(save_to)
        console.print(f"patch saved to {save_to} ({len(patcher.edits)} edits)")


def _demo_patcher(model_name: str, form: str, neuron_activation: str):
    """The demo's Patcher and how it asks ('auto' resolved): asked in the plain template, its
    memory also holds tpatcher's everyday questions in that template
    (``PatcherConfig.memory_question_prompt``), as chat memory holds them as chat turns, so
    that edits stay silent on the other questions the template asks."""
    from .demo_facts import question_prompt
    from .encoding import has_chat_template
    from .models import load_model
    from .patcher import Patcher

    try:
        _, config = _settings(None, "{}", neuron_activation)
    except (TypeError, ValueError) as error:
        raise TPatcherError(str(error)) from error
    with console.status(f"loading {model_name}"):
        model, tokenizer = load_model(model_name)
    if form == "auto":
        form = "chat" if has_chat_template(tokenizer) else "template"
    if form == "template":
        config = replace(config, memory_question_prompt=question_prompt("{question}"))
    return Patcher(model, tokenizer, config), form


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else "(nothing)"


def _answered(answer: str, text: str) -> bool:
    """Whether the first line of ``text`` starts with ``answer`` as a whole word or phrase."""
    line = _first_line(text).lower()
    answer = answer.lower()
    return line.startswith(answer) and not line[len(answer) : len(answer) + 1].isalnum()


def _print_demo(rows: list, asker: _DemoAsker, controls: dict[str, str]) -> None:
    table = Table(title="Mistakes patched one after another", show_lines=True)
    for column in ("question", "target", "before", "after", "s/edit", "paraphrase after"):
        table.add_column(column, overflow="fold")
    for fact, before, after, para_after, result in rows:
        ok = "[green]" if asker.answered(fact.answer, after) else "[red]"
        para_ok = "[green]" if asker.answered(fact.answer, para_after) else "[yellow]"
        seconds = f"{result.seconds:.2f}" if result.success else "failed"
        table.add_row(
            fact.question,
            fact.answer,
            asker.shown(before),
            ok + asker.shown(after),
            seconds,
            para_ok + fact.paraphrase + " → " + asker.shown(para_after),
        )
    console.print(table)
    fixed = sum(asker.answered(fact.answer, after) for fact, _, after, *_ in rows)
    general = sum(asker.answered(fact.answer, para) for fact, _, _, para, _ in rows)
    times = sorted(r.seconds for *_, r in rows if r.success)
    median = times[len(times) // 2] if times else float("nan")
    console.print(
        f"{len(rows)} mistakes patched: {fixed} answers now give the target, "
        f"{general} paraphrases do; median {median:.2f} s per edit; "
        f"{asker.patcher.num_neurons} neurons added"
    )
    kept = 0
    check = Table(title="Unrelated questions (must answer as before)")
    check.add_column("question")
    check.add_column("answer before and after")
    check.add_column("same?")
    for question, before in controls.items():
        after = asker.ask(question)
        same = asker.shown(after) == asker.shown(before)
        kept += same
        check.add_row(question, asker.shown(after), "[green]yes" if same else "[red]no")
    console.print(check)
    console.print(f"{kept}/{len(controls)} unrelated answers unchanged")


def _register_optional_commands() -> None:
    from .evaluation.command import bench
    from .export import export
    from .server.command import serve

    app.command("bench")(bench)
    app.command("export")(export)
    app.command("serve")(serve)


_register_optional_commands()


if __name__ == "__main__":  # pragma: no cover
    app()
