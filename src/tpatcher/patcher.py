"""The Patcher: fix a model's mistakes one at a time by adding neurons to its last FFN."""

from __future__ import annotations

import copy
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import persistence
from .adapters import (
    ArchitectureAdapter,
    VocabRows,
    find_adapter,
    get_submodule,
    resolve_layers_override,
)
from .capture import record
from .config import PatcherConfig
from .encoding import Example, context_length, encode_edit
from .errors import (
    InvalidEditError,
    PatchDirectoryError,
    UnknownEditError,
    UnsupportedModelError,
)
from .layer import NeuronState, NewNeurons, PatchLayer
from .memory import (
    DEFAULT_SOURCE,
    MemoryBank,
    cache_key,
    cached_vectors,
    default_prompts,
    subsample,
)
from .training import LogitsFn, train_edit

logger = logging.getLogger("tpatcher")


@dataclass
class EditResult:
    """What one call of :meth:`Patcher.edit` did.

    ``success`` is checked with a real forward pass of the patched model after the neurons
    are committed. ``already_correct`` edits change nothing and get no id.
    """

    edit_id: str | None
    success: bool
    steps: int
    seconds: float
    neurons: int
    losses: dict[str, float] = field(default_factory=dict)
    already_correct: bool = False
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EditRecord:
    """A committed edit: its provenance and the FFN inputs it added to the memory bank."""

    edit_id: str
    prompt: str
    target: str | None
    label: int | None
    created: str
    neurons: int
    memory: torch.Tensor = field(repr=False)
    steps: int = 0
    seconds: float = 0.0

    def to_manifest(self) -> dict[str, Any]:
        return {
            "id": self.edit_id,
            "prompt": self.prompt,
            "target": self.target,
            "label": self.label,
            "created": self.created,
            "neurons": self.neurons,
            "steps": self.steps,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class Capture:
    """What one forward pass leaves for the cached loop (batch dimension 1 kept)."""

    q: torch.Tensor  # FFN inputs at every position, (1, L, d)
    ffn_out: torch.Tensor  # FFN output incl. committed neurons, at supervised positions
    rebuild_from: torch.Tensor  # tensor the block output is rebuilt from, supervised positions
    logits: torch.Tensor  # (k, C) logits at supervised positions


class Patcher:
    """Transformer-Patcher on a Hugging Face model.

    >>> patcher = Patcher(model, tokenizer)
    >>> result = patcher.edit("The capital of Australia is", "Canberra")
    >>> patcher.save("patches/")

    The model stays an ordinary ``transformers`` model: ``model.generate`` uses the patch.
    Base weights are frozen (``requires_grad`` is switched off) and never modified.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PatcherConfig | None = None,
        *,
        memory_texts: Sequence[str] | None = None,
        memory_source: str | None = None,
        base_model_name: str | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config or PatcherConfig()
        self.adapter: ArchitectureAdapter = find_adapter(model)
        block_path = self.adapter.block_path(model)
        if self.config.target_module:
            block_path = resolve_layers_override(self.adapter, model, self.config.target_module)
        self.block_path = block_path
        self.block = get_submodule(model, block_path)
        self.task = self.adapter.task
        self.base_model_name = base_model_name or _model_name(model)
        self._memory_texts = list(memory_texts) if memory_texts is not None else None
        self._memory_source = memory_source
        self._memory: MemoryBank | None = None
        self.records: dict[str, EditRecord] = {}
        self._lock = threading.RLock()
        self._counter = 0

        value_proj = get_submodule(self.block, self.adapter.value_proj)
        key_proj = get_submodule(self.block, self.adapter.key_proj)
        if value_proj.weight.device.type == "meta":
            raise UnsupportedModelError(
                f"the last FFN ({block_path}) is offloaded (its weights are on the 'meta' "
                "device); tpatcher patches and fingerprints the last layer, so it must be "
                "resident: map that layer to a GPU or the CPU without offloading"
            )
        self.ffn_activation = self.adapter.activation(model.config)
        self.activation = self.config.resolved_neuron_activation(self.ffn_activation)
        self.layer = PatchLayer(
            get_submodule(self.block, self.adapter.ffn_input),
            get_submodule(self.block, self.adapter.ffn_output),
            activation=self.activation,
            gated=self.adapter.gated,
            has_bias=getattr(key_proj, "bias", None) is not None,
            dtype=value_proj.weight.dtype,
            device=value_proj.weight.device,
            hidden_size=_hidden_size(value_proj),
        )
        model.requires_grad_(False)  # base weights are frozen; only new neurons train
        self.beta = self.config.resolved_memory_threshold(self.activation)
        self.memory_weight = self.config.resolved_memory_weight(self.task)
        self._fingerprint: str | None = None

    # -- properties ----------------------------------------------------------------------
    @property
    def edits(self) -> list[EditRecord]:
        """Committed edits, oldest first."""
        return list(self.records.values())

    @property
    def num_neurons(self) -> int:
        return self.layer.num_neurons

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the unpatched last FFN's weights: identifies the base model."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            names = [self.adapter.key_proj, self.adapter.value_proj]
            if self.adapter.gate_proj:
                names.append(self.adapter.gate_proj)
            for name in names:
                for tensor in get_submodule(self.block, name).state_dict().values():
                    data = tensor.detach().cpu().contiguous()
                    digest.update(str(tuple(data.shape)).encode())
                    digest.update(data.view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    @property
    def memory(self) -> MemoryBank:
        """The memory bank, built on first use (see :mod:`tpatcher.memory`)."""
        with self._lock:
            if self._memory is None:
                self._memory = self._build_memory()
                for record_ in self.records.values():
                    self._memory.add_edit(record_.edit_id, record_.memory)
            return self._memory

    @property
    def input_device(self) -> torch.device:
        """Where inputs go: the embedding's execution device (accelerate may offload it)."""
        embeddings = self.model.get_input_embeddings()
        hook = getattr(embeddings, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        return torch.device(device) if device is not None else embeddings.weight.device

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    # -- encoding ------------------------------------------------------------------------
    def encode(self, prompt: str, target: str | int | None) -> Example:
        """Tokenise an edit, refusing inputs that cannot be trained on."""
        return encode_edit(
            self.tokenizer,
            self.model,
            prompt,
            target,
            task=self.task,
            add_space_before_target=self.config.add_space_before_target,
        )

    # -- forward passes ------------------------------------------------------------------
    def _points(self) -> dict[str, tuple[nn.Module, str]]:
        adapter = self.adapter
        points: dict[str, tuple[nn.Module, str]] = {
            "q": (get_submodule(self.block, adapter.ffn_input), "input"),
            "ffn_out": (get_submodule(self.block, adapter.ffn_output), "output"),
        }
        if adapter.recombine == "layer-norm":
            points["rebuild_from"] = (get_submodule(self.block, adapter.capture), "input")
        else:
            block_out = (
                get_submodule(self.block, adapter.capture) if adapter.capture else self.block
            )
            points["rebuild_from"] = (block_out, "output")
        return points

    def _run(self, inputs: dict[str, torch.Tensor]) -> Any:
        device = self.input_device
        return self.model(**{k: v.to(device) for k, v in inputs.items()})

    def _logits_at(self, output: Any, positions: torch.Tensor) -> torch.Tensor:
        logits = output.logits
        if self.task == "seq-cls":
            return logits.reshape(1, -1)
        return logits[0, positions.to(logits.device)]

    def capture(self, example: Example) -> Capture:
        """One forward pass of the patched model, keeping what the cached loop needs."""
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), record(self._points()) as store:
                output = self._run(example.inputs)
        finally:
            self.model.train(was_training)
        pos = example.positions.to(store["q"].device)
        return Capture(
            q=store["q"],
            ffn_out=store["ffn_out"][:, pos],
            rebuild_from=store["rebuild_from"][:, pos.to(store["rebuild_from"].device)],
            logits=self._logits_at(output, example.positions),
        )

    def _tail_logits(
        self, capture: Capture, delta: torch.Tensor, rows: VocabRows | None = None
    ) -> torch.Tensor:
        """Logits at the supervised positions when ``delta`` is added to the FFN output."""
        hidden = self.adapter.rebuild(
            self.block,
            capture.rebuild_from,
            capture.ffn_out,
            delta.to(capture.rebuild_from.dtype),
        )
        logits = self.adapter.head(self.model, hidden, rows)
        return logits.reshape(-1, logits.shape[-1])

    def is_mistake(self, prompt: str, target: str | int) -> bool:
        """Whether the patched model gets this wrong (teacher-forced greedy, or the label)."""
        example = self.encode(prompt, target)
        with torch.no_grad():
            logits = self._logits_at(self._run_eval(example.inputs), example.positions)
        return not bool((logits.argmax(-1).cpu() == example.targets).all())

    def _run_eval(self, inputs: dict[str, torch.Tensor]) -> Any:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run(inputs)
        finally:
            self.model.train(was_training)

    # -- editing -------------------------------------------------------------------------
    def edit(
        self,
        prompt: str,
        target: str | int | None = None,
        *,
        label: str | int | None = None,
        edit_id: str | None = None,
        progress: Callable[[int, dict[str, float]], None] | None = None,
    ) -> EditResult:
        """Fix the model's output for ``prompt``: ``target`` text, or ``label`` for a classifier.

        Adds at most ``max_neurons_per_edit`` neurons (one for a classifier) and trains them.
        An input the model already gets right is left alone (``already_correct``). An edit
        that cannot be fixed within ``max_steps`` leaves no neurons behind.
        """
        if self.task == "seq-cls":
            target = label if label is not None else target
        elif label is not None:
            raise InvalidEditError("label= is for classifiers; pass the target text")
        if edit_id is not None and (edit_id in self.records or not _valid_id(edit_id)):
            raise InvalidEditError(f"edit id {edit_id!r} is already used or not valid")
        with self._lock:
            start = time.perf_counter()
            example = self.encode(prompt, target)
            cap = self.capture(example)
            wrong = (cap.logits.argmax(-1).cpu() != example.targets).nonzero().flatten()
            if len(wrong) == 0:
                return EditResult(
                    None,
                    True,
                    0,
                    time.perf_counter() - start,
                    0,
                    already_correct=True,
                    message="the model already gets this right",
                )
            memory = self.memory.vectors()
            sites = example.positions[wrong[: self._max_neurons()]]
            q_all = cap.q[0].to(torch.promote_types(cap.q.dtype, torch.float32))
            q_edit = q_all[sites.to(q_all.device)]
            seed = self.config.seed + self._counter
            self._counter += 1
            neurons = NewNeurons(
                q_edit.cpu(),
                gated=self.adapter.gated,
                has_bias=self.layer.has_bias,
                activation=self.activation,
                amplifier_init=self.config.value_amplifier_init,
                generator=torch.Generator().manual_seed(seed),
            ).to(q_edit.device)
            targets = example.targets.to(cap.logits.device)
            logits_fn = self._logits_fn(example, cap)
            outcome = train_edit(
                neurons,
                logits_fn,
                targets,
                q_edit,
                memory.to(device=q_edit.device, dtype=q_edit.dtype),
                config=self.config,
                beta=self.beta,
                memory_weight=self.memory_weight,
                vocab_size=cap.logits.shape[-1],
                progress=progress,
            )
            seconds = time.perf_counter() - start
            if not outcome.fixed:
                return EditResult(
                    None,
                    False,
                    outcome.steps,
                    seconds,
                    0,
                    outcome.losses,
                    message=f"not fixed within {self.config.max_steps} steps; no neurons kept",
                )
            new_id = edit_id or uuid.uuid4().hex[:12]
            frozen = neurons.frozen(new_id, self.layer.dtype, self.layer.device)
            before = self.layer.state
            self.layer.state = before.concat(frozen)
            if self.is_mistake(prompt, target):  # the real model must agree with the cache
                self.layer.state = before
                return EditResult(
                    None,
                    False,
                    outcome.steps,
                    time.perf_counter() - start,
                    0,
                    outcome.losses,
                    message="trained, but the full model still gets it wrong; no neurons kept",
                )
            positions = example.positions if self.task == "seq-cls" else slice(None)
            record_ = EditRecord(
                edit_id=new_id,
                prompt=prompt,
                target=None if self.task == "seq-cls" else str(target),
                label=int(example.targets[0]) if self.task == "seq-cls" else None,
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                neurons=frozen.size,
                memory=q_all[positions].detach().cpu(),
                steps=outcome.steps,
                seconds=time.perf_counter() - start,
            )
            self.records[new_id] = record_
            if self.config.add_edits_to_memory:
                self.memory.add_edit(new_id, record_.memory)
            return EditResult(
                new_id, True, outcome.steps, record_.seconds, frozen.size, outcome.losses
            )

    def _max_neurons(self) -> int:
        return 1 if self.task == "seq-cls" else self.config.max_neurons_per_edit

    def _logits_fn(self, example: Example, cap: Capture) -> LogitsFn:
        if self.config.training_loop == "cached":
            pos = example.positions.to(cap.q.device)
            q_sup = cap.q[:, pos].to(torch.promote_types(cap.q.dtype, torch.float32))

            def cached(neurons: NewNeurons, rows: VocabRows | None) -> torch.Tensor:
                return self._tail_logits(cap, neurons(q_sup), rows)

            return cached

        def full(neurons: NewNeurons, rows: VocabRows | None) -> torch.Tensor:
            was_training = self.model.training
            self.model.eval()
            try:
                with self.layer.training(neurons):
                    logits = self._logits_at(self._run(example.inputs), example.positions)
            finally:
                self.model.train(was_training)
            if rows is None:
                return logits
            return logits.index_select(1, rows.index.to(logits.device))

        return full

    # -- managing edits ------------------------------------------------------------------
    def rollback(self, edit_id: str) -> None:
        """Remove exactly the neurons (and memory vectors) of one edit."""
        with self._lock:
            if edit_id not in self.records:
                raise UnknownEditError(f"no edit with id {edit_id!r}")
            state = self.layer.state
            keep = torch.tensor([owner != edit_id for owner in state.owners], dtype=torch.bool)
            self.layer.state = state.select(keep)
            del self.records[edit_id]
            if self._memory is not None:
                self._memory.remove_edit(edit_id)

    def disable(self) -> None:
        """Answer with the base model until :meth:`enable`; edits are kept."""
        self.layer.enabled = False

    def enable(self) -> None:
        self.layer.enabled = True

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """``with patcher.disabled(): ...`` runs the unpatched model."""
        previous = self.layer.enabled
        self.layer.enabled = False
        try:
            yield
        finally:
            self.layer.enabled = previous

    def generate(self, prompt: str, max_new_tokens: int = 32, **kwargs: Any) -> str:
        """Greedy (by default) continuation of ``prompt`` by the patched model, as text."""
        enc = self.tokenizer(prompt, return_tensors="pt").to(self.input_device)
        kwargs.setdefault("do_sample", False)
        if self.tokenizer.pad_token_id is None:
            kwargs.setdefault("pad_token_id", self.tokenizer.eos_token_id)
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_new_tokens, **kwargs)
        new = out[0] if self.task == "seq2seq" else out[0, enc["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True)

    def classify(self, text: str) -> int:
        """The patched classifier's label for ``text``."""
        with torch.no_grad():
            out = self._run_eval(dict(self.tokenizer(text, return_tensors="pt")))
        return int(out.logits.argmax(-1)[0])

    # -- memory --------------------------------------------------------------------------
    def memory_vectors(self, texts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """Last-FFN inputs of ``texts``: every token position, or the head's position for a
        classifier. For a seq2seq model, decoder positions with the text as decoder input."""
        chunks: list[torch.Tensor] = []
        point = {"q": (get_submodule(self.block, self.adapter.ffn_input), "input")}
        pad_side = getattr(self.tokenizer, "padding_side", "right")
        self.tokenizer.padding_side = "right"
        try:
            for i in range(0, len(texts), batch_size):
                batch = list(texts[i : i + batch_size])
                enc = self._batch(batch)
                with torch.no_grad(), record(point) as store:  # type: ignore[arg-type]
                    self._run_eval(enc)
                q = store["q"].float().cpu()
                if self.task == "seq-cls":
                    chunks.append(q[:, 0])
                else:
                    mask_key = (
                        "decoder_attention_mask" if self.task == "seq2seq" else "attention_mask"
                    )
                    chunks.append(q[enc[mask_key].bool()])
        finally:
            self.tokenizer.padding_side = pad_side
        return torch.cat(chunks) if chunks else torch.zeros(0, self.layer.hidden_size)

    def _batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = context_length(self.model) or 512
        enc = dict(
            self.tokenizer(
                texts, return_tensors="pt", padding=True, truncation=True, max_length=limit
            )
        )
        if self.task == "seq2seq":
            enc["decoder_input_ids"] = self.model.prepare_decoder_input_ids_from_labels(
                labels=enc["input_ids"]
            )
            enc["decoder_attention_mask"] = enc["attention_mask"]
        return enc

    def _build_memory(self) -> MemoryBank:
        limit = self.config.memory_size
        if self._memory_texts is not None:
            vectors = subsample(self.memory_vectors(self._memory_texts), limit, self.config.seed)
            source = self._memory_source or f"{len(self._memory_texts)} user-supplied texts"
            if self.config.include_default_memory:
                vectors = torch.cat([vectors, self._default_bank(limit)])
                source = f"{source}; and {DEFAULT_SOURCE}"
            logger.info("memory bank: %d vectors from %s", vectors.shape[0], source)
            return MemoryBank(vectors, source)
        vectors = self._default_bank(limit)
        logger.info("memory bank: %d vectors from %s", vectors.shape[0], DEFAULT_SOURCE)
        return MemoryBank(vectors, DEFAULT_SOURCE)

    def _default_bank(self, limit: int) -> torch.Tensor:
        """The default memory vectors, cached per model fingerprint."""
        prompts = default_prompts()
        key = cache_key(self.fingerprint, prompts, f"{self.task}-{limit}-v1")
        with self.disabled():
            return cached_vectors(key, lambda: self._default_vectors(prompts, limit))

    def _default_vectors(self, prompts: list[str], limit: int) -> torch.Tensor:
        """FFN inputs over generic prompts and the unedited model's own continuations."""
        texts = list(prompts)
        if self.task != "seq-cls":
            torch.manual_seed(self.config.seed)
            texts += self.generate_batch(prompts * 2, 48, do_sample=True, top_p=0.95)
        return subsample(self.memory_vectors(texts), limit, self.config.seed)

    def generate_batch(
        self, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 32, **kwargs: Any
    ) -> list[str]:
        """Prompt plus continuation for each prompt, generated in left-padded batches."""
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        texts: list[str] = []
        try:
            for i in range(0, len(prompts), batch_size):
                batch = list(prompts[i : i + batch_size])
                enc = self.tokenizer(batch, return_tensors="pt", padding=True)
                enc = enc.to(self.input_device)
                with torch.no_grad():
                    out = self.model.generate(
                        **enc,
                        max_new_tokens=max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                        **kwargs,
                    )
                if self.task == "seq2seq":
                    new = out
                else:
                    new = out[:, enc["input_ids"].shape[1] :]
                for prompt, ids in zip(batch, new, strict=True):
                    texts.append(prompt + self.tokenizer.decode(ids, skip_special_tokens=True))
        finally:
            self.tokenizer.padding_side = side
        return texts

    # -- persistence ---------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "base_model": self.base_model_name,
            "fingerprint": self.fingerprint,
            "adapter": self.adapter.name,
            "patched_module": self.block_path,
            "config": self.config.to_dict(),
            "activation": self.activation,  # of the neurons, as resolved; checked on load
            "edits_attempted": self._counter,  # seeds the next edit's neurons (seed + count)
            "edits": [r.to_manifest() for r in self.records.values()],
        }

    def edit_tensors(self, edit_id: str) -> dict[str, torch.Tensor]:
        """The tensors that describe one committed edit (as saved)."""
        state = self.layer.state
        mask = torch.tensor([o == edit_id for o in state.owners], dtype=torch.bool)
        mine = state.select(mask)
        tensors = {"keys": mine.keys, "values": mine.values, "memory": self.records[edit_id].memory}
        if mine.up_keys is not None:
            tensors["up_keys"] = mine.up_keys
        if mine.biases is not None:
            tensors["biases"] = mine.biases
        return tensors

    def save(self, directory: str | Path) -> Path:
        """Write the patch (edit tensors and manifest) atomically; returns the directory."""
        directory = Path(directory)
        with self._lock:
            manifest = self.manifest()
            for entry in manifest["edits"]:
                entry["sha256"] = persistence.write_edit(
                    directory, entry["id"], self.edit_tensors(entry["id"])
                )
            persistence.write_manifest(directory, manifest)
            persistence.remove_unlisted(directory, set(self.records))
        return directory

    @classmethod
    def load(
        cls,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        directory: str | Path,
        config: PatcherConfig | None = None,
        **kwargs: Any,
    ) -> Patcher:
        """A Patcher with the edits saved in ``directory``; refuses another model's patch."""
        manifest = persistence.read_manifest(Path(directory))
        patcher = cls(
            model,
            tokenizer,
            config or PatcherConfig.from_manifest(manifest),
            **kwargs,
        )
        try:
            patcher.add_saved_edits(directory, manifest)
        except BaseException:
            patcher.close()
            raise
        return patcher

    def add_saved_edits(self, directory: str | Path, manifest: dict[str, Any]) -> None:
        """Verify every saved edit, then switch them all in at once (all or nothing)."""
        if manifest.get("fingerprint") != self.fingerprint:
            raise PatchDirectoryError(
                f"{directory} was made for base model {manifest.get('base_model')!r} "
                f"(fingerprint {str(manifest.get('fingerprint'))[:12]}), not for this model "
                f"{self.base_model_name!r} (fingerprint {self.fingerprint[:12]})"
            )
        saved = manifest.get("activation") or PatcherConfig.from_manifest(
            manifest
        ).resolved_neuron_activation(self.ffn_activation)
        if manifest["edits"] and saved != self.activation:
            raise PatchDirectoryError(
                f"{directory} holds neurons with activation {saved!r}, but this patcher's "
                f"neurons use {self.activation!r}; load it with the config it was saved with "
                "(Patcher.load without config) or set neuron_activation accordingly"
            )
        state = self.layer.state
        records: list[EditRecord] = []
        for entry in manifest["edits"]:
            tensors = persistence.read_edit(Path(directory), entry)
            edit_id = str(entry["id"])
            if edit_id in self.records:
                raise PatchDirectoryError(f"edit {edit_id} is already loaded")
            state = state.concat(self._state_from(edit_id, tensors, directory))
            records.append(
                EditRecord(
                    edit_id=edit_id,
                    prompt=str(entry.get("prompt", "")),
                    target=entry.get("target"),
                    label=entry.get("label"),
                    created=str(entry.get("created", "")),
                    neurons=int(tensors["keys"].shape[0]),
                    memory=tensors.get("memory", torch.zeros(0, self.layer.hidden_size)),
                    steps=int(entry.get("steps", 0)),
                    seconds=float(entry.get("seconds", 0.0)),
                )
            )
        self.layer.state = state
        self._counter = max(self._counter, int(manifest.get("edits_attempted", len(records))))
        for record_ in records:
            self.records[record_.edit_id] = record_
            if self._memory is not None and self.config.add_edits_to_memory:
                self._memory.add_edit(record_.edit_id, record_.memory)

    def _state_from(
        self, edit_id: str, tensors: dict[str, torch.Tensor], where: Any
    ) -> NeuronState:
        d = self.layer.hidden_size
        keys, values = tensors.get("keys"), tensors.get("values")
        up, biases = tensors.get("up_keys"), tensors.get("biases")
        bad = (
            keys is None
            or values is None
            or keys.ndim != 2
            or keys.shape[1] != d
            or values.shape != keys.shape
            or (self.layer.gated != (up is not None))
            or (up is not None and up.shape != keys.shape)
            or (self.layer.has_bias != (biases is not None))
            or (biases is not None and biases.shape != (keys.shape[0],))
        )
        if bad:
            raise PatchDirectoryError(f"edit {edit_id} in {where} does not fit this model's FFN")

        def to(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=self.layer.device, dtype=self.layer.dtype)

        return NeuronState(
            keys=to(keys),  # type: ignore[arg-type]
            values=to(values),  # type: ignore[arg-type]
            up_keys=to(up),
            biases=to(biases),
            owners=(edit_id,) * keys.shape[0],  # type: ignore[union-attr]
        )

    def close(self) -> None:
        """Remove the hooks: the model answers as the base model again."""
        self.layer.remove()

    # -- merging -------------------------------------------------------------------------
    def merge(self) -> PreTrainedModel:
        """A plain copy of the model with the neurons folded into a wider last FFN.

        The copy needs no tpatcher at run time. Its last FFN is wider than the config says,
        so it runs in memory but ``save_pretrained`` cannot round-trip it; keep the patch
        directory as the saved form. Neurons whose activation is not the FFN's
        (``neuron_activation``) cannot be folded in; that is refused.
        """
        if self.layer.state.size and self.activation != self.ffn_activation:
            raise UnsupportedModelError(
                f"this patch's neurons use {self.activation!r} but the FFN uses "
                f"{self.ffn_activation!r}, so they cannot be folded into it; keep the patch "
                "directory (and tpatcher) instead, or edit with neuron_activation=None"
            )
        self.layer.remove()
        try:
            merged = copy.deepcopy(self.model)
        finally:
            self.layer = _reattach(self.layer, self.block, self.adapter)
        if not self.layer.enabled or not self.layer.state.size:
            return merged
        block = get_submodule(merged, self.block_path)
        state = self.layer.state
        adapter = self.adapter
        if adapter.gated:
            _grow_out(get_submodule(block, adapter.gate_proj), state.keys, None)  # type: ignore[arg-type]
            _grow_out(get_submodule(block, adapter.key_proj), state.up_keys, None)  # type: ignore[arg-type]
        else:
            _grow_out(get_submodule(block, adapter.key_proj), state.keys, state.biases)
        _grow_in(get_submodule(block, adapter.value_proj), state.values)
        return merged


def _reattach(layer: PatchLayer, block: nn.Module, adapter: ArchitectureAdapter) -> PatchLayer:
    fresh = PatchLayer(
        get_submodule(block, adapter.ffn_input),
        get_submodule(block, adapter.ffn_output),
        activation=layer.activation,
        gated=layer.gated,
        has_bias=layer.has_bias,
        dtype=layer.dtype,
        device=layer.device,
        hidden_size=layer.hidden_size,
    )
    fresh.state, fresh.enabled = layer.state, layer.enabled
    return fresh


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2 stores weights as (in, out)


def _grow_out(module: nn.Module, rows: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Append output units (``rows``: (n, in)) to a linear map."""
    weight = module.weight
    rows = rows.to(device=weight.device, dtype=weight.dtype)
    if _is_conv1d(module):
        module.weight = nn.Parameter(torch.cat([weight.data, rows.T], dim=1), requires_grad=False)
        module.nf = module.weight.shape[1]
    else:
        module.weight = nn.Parameter(torch.cat([weight.data, rows], dim=0), requires_grad=False)
        module.out_features = module.weight.shape[0]
    if getattr(module, "bias", None) is not None:
        extra = bias if bias is not None else torch.zeros(rows.shape[0])
        extra = extra.to(device=weight.device, dtype=weight.dtype)
        module.bias = nn.Parameter(torch.cat([module.bias.data, extra]), requires_grad=False)


def _grow_in(module: nn.Module, values: torch.Tensor) -> None:
    """Append input units whose output weights are ``values`` (n, out)."""
    weight = module.weight
    values = values.to(device=weight.device, dtype=weight.dtype)
    if _is_conv1d(module):
        module.weight = nn.Parameter(torch.cat([weight.data, values], dim=0), requires_grad=False)
    else:
        module.weight = nn.Parameter(torch.cat([weight.data, values.T], dim=1), requires_grad=False)
        module.in_features = module.weight.shape[1]


def _hidden_size(value_proj: nn.Module) -> int:
    weight = value_proj.weight
    return int(weight.shape[1] if _is_conv1d(value_proj) else weight.shape[0])


def _model_name(model: PreTrainedModel) -> str:
    return str(getattr(model.config, "name_or_path", "") or getattr(model, "name_or_path", ""))


def _valid_id(edit_id: str) -> bool:
    return bool(persistence._EDIT_ID.match(edit_id))
