"""Take a patched model out of tpatcher: a standard checkpoint for transformers and vLLM, or a
GGUF for llama.cpp, each computing what the patched model computes.

The patch neurons are folded into the last FFN (:func:`tpatcher.merging.merge_into`). A
``transformers`` config has one FFN width for all layers, so the HF export pads every layer
to the merged width with zero neurons (they add exactly 0); the GGUF export keeps every
other tensor of the source GGUF as it is (:mod:`tpatcher.export_gguf`).

Outputs are written next to their final place under a temporary name and renamed at the
end, so an interrupted export leaves nothing that looks finished.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import typer
from rich.console import Console
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .errors import TPatcherError
from .export_gguf import Layout, write_gguf
from .ffn_site import FFNSite
from .merging import merge_into, widen_all_layers

__all__ = ["ExportError", "export", "export_patch", "merge_patch"]

Format = Literal["hf", "gguf"]
MARKER = "tpatcher-export.json"
GGUF_ADAPTERS = ("llama", "gemma")


class ExportError(TPatcherError):
    """The export cannot be done as asked (format, output path, model)."""


def export_patch(
    patch_dir: str | Path,
    model_name_or_path: str,
    out_dir: str | Path,
    format: Format = "hf",
    force: bool = False,
    pad_to: int = 64,
    *,
    gguf_layout: Layout = "auto",
    scale: float | None = None,
    cache_dir: str | Path | None = None,
) -> Path:
    """Merge the patch in ``patch_dir`` into ``model_name_or_path`` and write it to ``out_dir``.

    ``format="hf"``: a folder that ``AutoModelForCausalLM.from_pretrained`` loads without
    tpatcher. ``format="gguf"``: one ``.gguf`` file (``out_dir`` is its path), for embedded
    GGUF models only. An existing output is replaced only with ``force``. Returns the path.
    """
    from .models import load_model

    if format not in ("hf", "gguf"):
        raise ExportError(f"unknown export format {format!r}; expected 'hf' or 'gguf'")
    if pad_to < 1:
        raise ExportError(f"pad_to must be at least 1, not {pad_to}")
    if gguf_layout not in ("auto", "deci", "uniform"):
        raise ExportError(f"unknown GGUF layout {gguf_layout!r}; expected auto, deci or uniform")
    out = Path(out_dir).expanduser().resolve()
    _check_target(out, format, force)
    if format == "gguf":
        _gguf_entry(model_name_or_path)  # fail before the slow load
    model, tokenizer = load_model(model_name_or_path, cache_dir=cache_dir)
    site, info = merge_patch(model, tokenizer, patch_dir, scale=scale)
    info.update(base_model=model_name_or_path, patch_dir=str(Path(patch_dir).resolve()))
    if format == "hf":
        _write_hf(model, tokenizer, site, out, pad_to, info)
    else:
        if site.adapter.name not in GGUF_ADAPTERS:
            raise ExportError(
                f"GGUF export supports {', '.join(GGUF_ADAPTERS)} models, not {site.adapter.name}"
            )
        _write_gguf(model_name_or_path, site, out, gguf_layout, pad_to)
    return out


def merge_patch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    patch_dir: str | Path,
    *,
    scale: float | None = None,
) -> tuple[FFNSite, dict[str, Any]]:
    """Fold the patch in ``patch_dir`` into ``model`` in place; the patcher's hooks are removed.

    :meth:`Patcher.load` refuses a patch made for another base model (fingerprint).
    """
    from .patcher import Patcher

    patcher = Patcher.load(model, tokenizer, patch_dir)
    try:
        state, activation = patcher.neurons, patcher.activation
        adapter, block_path = patcher.adapter, patcher.block_path
    finally:
        patcher.close()
    site = FFNSite(model, adapter, block_path)
    base_width = site.width
    merge_into(model, site, state, activation, scale=scale)
    info = {
        "neurons": state.size,
        "edits": len(set(state.owners)),
        "neuron_activation": activation,
        "ffn_activation": site.ffn_activation,
        "last_ffn_width": {"base": base_width, "merged": site.width},
    }
    return site, info


# -- output paths --------------------------------------------------------------------------
def _check_target(out: Path, format: str, force: bool) -> None:
    """Refuse to overwrite without ``force``, and even with it, anything not an export."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise ExportError(f"{out} already exists; pass --force (force=True) to replace it")
    if format == "gguf" and out.is_dir():
        raise ExportError(f"{out} is a directory; a GGUF export is one file")
    if format == "hf" and not out.is_dir():
        raise ExportError(f"{out} is a file; an HF export is a directory")
    if format == "hf" and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExportError(f"{out} is not empty and not a tpatcher export; not replacing it")


def _temp_sibling(out: Path) -> Path:
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """A temporary sibling folder that replaces ``out`` when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            trash = _temp_sibling(out)
            os.rename(out, trash)
            os.rename(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def _atomic_file(out: Path) -> Iterator[Path]:
    """A temporary sibling file that replaces ``out`` when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(out)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- transformers ----------------------------------------------------------------------------
def _write_hf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    site: FFNSite,
    out: Path,
    pad_to: int,
    info: dict[str, Any],
) -> None:
    """Pad every layer to the merged width and save a plain checkpoint."""
    width = widen_all_layers(model, pad_to, site.adapter)
    info.update(format="hf", intermediate_size=width)
    with _atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# -- GGUF ------------------------------------------------------------------------------------
def _gguf_entry(name: str) -> Any:
    """The embedded model whose GGUF the export starts from."""
    from .models import EMBEDDED_MODELS

    entry = EMBEDDED_MODELS.get(name)
    if entry is None or not entry.needs_conversion:
        have = [n for n, e in EMBEDDED_MODELS.items() if e.needs_conversion]
        raise ExportError(
            f"GGUF export starts from the GGUF the model came from, and {name!r} has none; "
            f"models with one: {', '.join(have)}. Export with --format hf and convert that "
            "folder with llama.cpp's convert_hf_to_gguf.py instead"
        )
    return entry


@contextmanager
def source_gguf(name: str) -> Iterator[Path]:
    """The path of an embedded model's GGUF (a split one is joined in a temporary folder)."""
    from .models import _package_dir

    entry = _gguf_entry(name)
    if entry.source == "gguf":
        path = _package_dir(entry) / entry.path
        if not path.is_file():
            raise ExportError(f"{path} is missing; reinstall it with `{entry.install}`")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tpatcher-gguf-") as scratch:
        package = importlib.import_module(entry.module)
        yield Path(package.assemble(Path(scratch) / entry.path))


def last_ffn_arrays(site: FFNSite) -> dict[str, Any]:
    """The merged last FFN as float32 numpy arrays in GGUF's (rows = output) layout."""

    def array(module: torch.nn.Module) -> Any:
        return module.weight.detach().to("cpu", torch.float32).numpy()

    if site.gate is None:
        raise ExportError("GGUF export needs a gated FFN (Llama, Gemma)")
    return {"ffn_gate": array(site.gate), "ffn_up": array(site.key), "ffn_down": array(site.value)}


def _write_gguf(name: str, site: FFNSite, out: Path, layout: Layout, pad_to: int) -> None:
    with source_gguf(name) as source, _atomic_file(out) as tmp:
        write_gguf(source, tmp, last_ffn_arrays(site), layout=layout, pad_to=pad_to)


# -- the command -----------------------------------------------------------------------------
def _base_model_of(patch_dir: Path) -> str:
    """The base model a patch directory records (used when --model is not given)."""
    try:
        manifest = json.loads((patch_dir / "manifest.json").read_text("utf-8"))
        return str(manifest["base_model"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{patch_dir} records no base model; pass --model") from exc


def export(
    patch_dir: Annotated[Path, typer.Argument(help="Patch directory (manifest.json + edits/)")],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder (hf) or .gguf file (gguf)")
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Base model (default: the one the patch records)"),
    ] = None,
    format: Annotated[str, typer.Option("--format", "-f", help="hf or gguf")] = "hf",
    force: Annotated[bool, typer.Option(help="Replace an existing export")] = False,
    pad_to: Annotated[int, typer.Option(min=1, help="Round the FFN width up to this")] = 64,
    gguf_layout: Annotated[
        str, typer.Option(help="auto, deci (only the last layer wider) or uniform")
    ] = "auto",
) -> None:
    """Merge a patch into its base model and write it for transformers/vLLM or llama.cpp."""
    console = Console()
    try:
        base = model or _base_model_of(patch_dir)
        with console.status(f"exporting {patch_dir} on {base} as {format}"):
            path = export_patch(
                patch_dir,
                base,
                out,
                format,
                force,
                pad_to,
                gguf_layout=gguf_layout,  # type: ignore[arg-type]
            )
    except TPatcherError as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(code=2) from None
    console.print(f"wrote {path}")
