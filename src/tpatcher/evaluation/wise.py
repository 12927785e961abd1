"""WISE (Wang et al., NeurIPS 2024, arXiv 2405.14768): a routed side memory at a late FFN.

Followed: zjunlp/EasyEdit@easyeditor/models/wise/WISE.py (``WISE.edit``, its losses and
``WISEAdapter``: side copy, gradient masks, routing, save/merge), @easyeditor/models/wise/
wise_main.py, @easyeditor/models/wise/utils.py (``EarlyStopMeter``, ``EditingMeanAct``),
@easyeditor/models/wise/merge/gta.py and merge/utils.py (TIES = ``GTA('magnitude', 'sum',
normalize=True)``), @easyeditor/models/wise/wise_hparams.py and the defaults of
@hparams/WISE/llama-7b.yaml.

The method: a side copy ``W'`` of a late FFN's down-projection (LLaMA-2-7B: layer 27 of 32;
here the same relative depth) is trained on each edit while the model's own weights (the
main memory ``W``) stay untouched. The loss is the edit's cross-entropy plus the activation
margins of the reference: with ``s(x)`` the activation score, ``mean_t ||act(a_t W'^T) -
act(a_t W^T)||`` over the tokens of ``x`` (``a_t`` the down-projection's input), the edit
must score above ``beta``, an irrelevant text below ``alpha``, and the edit above the text
by ``gamma``. The threshold is learnt from the edits: ``act_ratio`` times the lowest edit
score of the memory. At inference each sequence goes to the side memory with the highest
score among those above their threshold, or to ``W`` (the output is then exactly the base
model's). Knowledge sharding: each shard of ``save_freq`` edits trains a random
``mask_ratio`` share of ``W'``'s entries (gradient mask); every ``merge_freq`` edits the
shards are TIES-merged (magnitude pruning to ``densities``, sign election by sum,
disjoint mean). ``retrieve=True`` (the yaml's choice, WISE-Retrieve) keeps the merged
memories side by side and routes among them; ``retrieve=False`` (WISE-Merge) merges them
into one side memory.

The score is the reference's ``euc``: the model's FFN activation applied to both outputs
before their distance (the paper writes ``||A(x) (W'_v - W_v)||``); the margins were tuned
on it. :class:`HookedEditor` and :class:`LateFFN` (hooks, the call's token mask, the replay
from the edited block) are shared with :mod:`.memoir`.

Departures, and why:

* Training data: the tokens of :func:`encode_edit` (the same as every method) instead of
  the reference's 10 model-generated random prefixes plus the edit; the irrelevant text is
  one of ``locality_texts`` per edit (seeded), as the reference concatenates one ``loc``
  prompt. The fine-tuning loss is the mean over target tokens (the reference divides by
  the target length plus two prompt positions whose loss is 0); the scores average over
  real tokens (the reference's padded batch averages over pads too).
* The threshold records each edit's score after its last step (the reference records it
  one step earlier), so the weights that are used are the ones measured.
* No merge at inference time: the reference's ``WISE.__call__`` merges the open shard
  whenever the model is called after ``save_freq`` edits (``retrieve=False``), which would
  change the model while it is being measured. Saved-but-unmerged shards are not routed in
  WISE-Merge, as in the reference.
* With a KV cache, a decoding step routes on the running score of the whole sequence so
  far (what the reference computes without a cache), not on the new token alone.
* The replay of past edits (``replay``, the reference's Appendix B.3 option, off in its
  yaml) is not implemented.
* Training replays the model from the edited layer (the blocks' recorded inputs), not the
  whole model: the layers before it do not change, so this is exact (checked once, with a
  full-forward fallback).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from ..adapters import ADAPTERS, find_adapter, get_submodule
from ..encoding import Example
from ..errors import UnsupportedModelError
from ..ffn_site import eval_mode, input_device, is_conv1d
from .editors import BaselineEditor, EditOutcome, read_state, write_state

__all__ = ["LateFFN", "WiseEditor", "WiseSettings", "ties_merge"]

#: The reference edits layer 27 of LLaMA-2-7B's 32 (WISE and MEMOIR alike).
REFERENCE_DEPTH = (27, 32)


def supported_model_types() -> list[str]:
    return sorted({t for a in ADAPTERS if a.task == "causal-lm" for t in a.model_types})


def side_layer(n_layers: int, layer: int | None) -> int:
    """The edited block: ``layer`` (negative counts from the end) or the reference's depth."""
    if layer is None:
        return min(round(REFERENCE_DEPTH[0] / REFERENCE_DEPTH[1] * n_layers), n_layers - 1)
    index = layer + n_layers if layer < 0 else layer
    if not 0 <= index < n_layers:
        raise ValueError(f"layer {layer} is outside the model's {n_layers} blocks")
    return index


@dataclass
class Tail:
    """One recorded forward pass: the inputs of every block from the edited one on, the
    down-projection's input and output there, and the logits."""

    calls: list[tuple[tuple, dict[str, Any]]]
    act: torch.Tensor  # (B, S, width) input of the down-projection
    out: torch.Tensor  # (B, S, d) its output
    logits: torch.Tensor  # (B, S, V)


class LateFFN:
    """A late FFN's down-projection: its weights, hook point and the replay from its block.

    Nothing before the edited block changes while an edit trains, so one recorded forward
    pass gives every block from it on its inputs, and a training step reruns only those.
    """

    def __init__(self, model: PreTrainedModel, layer: int | None, method: str) -> None:
        adapter = find_adapter(model)
        if adapter.task != "causal-lm":
            raise UnsupportedModelError(
                f"{method} edits causal language models only; {adapter.name} is a "
                f"{adapter.task} model. Supported model types: "
                f"{', '.join(supported_model_types())}"
            )
        self.model = model
        self.adapter = adapter
        self.blocks: nn.ModuleList = get_submodule(model, adapter.layers)  # type: ignore[assignment]
        self.index = side_layer(len(self.blocks), layer)
        self.down = get_submodule(self.blocks[self.index], adapter.value_proj)
        self.path = f"{adapter.layers}.{self.index}.{adapter.value_proj}"
        self.conv1d = is_conv1d(self.down)
        self.act = ACT2FN[adapter.activation(model.config)]

    @property
    def weight(self) -> torch.Tensor:
        """The down-projection's weight as (out, in), whatever the module's layout."""
        w = self.down.weight
        return w.t() if self.conv1d else w

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.down, "bias", None)

    @property
    def width(self) -> int:
        return int(self.weight.shape[1])

    @property
    def device(self) -> torch.device:
        return self.down.weight.device

    def linear(self, a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The down-projection with ``weight`` (out, in) instead of its own, in float32."""
        bias = self.bias
        return F.linear(a.float(), weight.float(), None if bias is None else bias.float())

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model)

    def run(self, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the whole model on ``enc`` (no KV cache)."""
        device = self.input_device
        inputs = {k: v.to(device) for k, v in enc.items()}
        return self.model(**inputs, use_cache=False).logits

    def capture(self, enc: dict[str, torch.Tensor], store: dict[str, torch.Tensor]) -> Tail:
        """One forward pass recording each later block's inputs; ``store`` receives the
        down-projection's input/output from the editor's hook (mode ``capture``)."""
        calls: list[tuple[tuple, dict[str, Any]]] = []

        def pre(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            calls.append((args, dict(kwargs)))

        handles = [
            block.register_forward_pre_hook(pre, with_kwargs=True)
            for block in list(self.blocks)[self.index :]
        ]
        try:
            with torch.no_grad():
                logits = self.run(enc)
        finally:
            for handle in handles:
                handle.remove()
        return Tail(calls, store["act"], store["out"], logits)

    def replay(self, tail: Tail, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits from the edited block on, with whatever the hooks now do there; only at
        ``positions`` of row 0 when given (the head is per position, so this is exact)."""
        hidden = tail.calls[0][0][0]
        for block, (args, kwargs) in zip(list(self.blocks)[self.index :], tail.calls, strict=True):
            out = block(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        if positions is not None:
            hidden = hidden[:1, positions.to(hidden.device)]
        logits = self.adapter.head(self.model, hidden, None)
        return logits if positions is None else logits[0]


class EarlyStop:
    """The reference's ``EarlyStopMeter``: stop once the loss is <= 0.02 and flat (1e-4)."""

    def __init__(self) -> None:
        self.pre, self.val = 0.0, 1e9

    def stop(self) -> bool:
        return abs(self.val - self.pre) <= 1e-4 and self.val <= 0.02

    def update(self, val: float) -> None:
        self.pre, self.val = self.val, val


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No gradients for the model's own weights, restoring every flag after."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def ties_merge(
    base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], density: float
) -> torch.Tensor:
    """TIES merging as the reference's ``GTA('magnitude', 'sum', normalize=True)``.

    Task vectors ``t - base`` keep their ``density`` largest-magnitude entries; each entry's
    sign is elected by the weighted sum; agreeing entries are averaged by their weights.
    """
    deltas = []
    for t in tensors:
        delta = (t - base).float()
        if density < 1:
            k = int(density * delta.numel())
            if k <= 0:
                raise ValueError("densities leaves no entry of a task vector")
            keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
            keep[delta.abs().reshape(-1).topk(k).indices] = True
            delta = delta * keep.view_as(delta)
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, 1, 1)
    weighted = stacked * w
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    agree = (weighted.sign() == majority).to(stacked.dtype)
    mixed = (weighted * agree).sum(0)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (base.float() + mixed / divisor).to(base.dtype)


# --------------------------------------------------------------------------------------------
# the editor machinery shared with MEMOIR: settings, hooks, the call's token mask
# --------------------------------------------------------------------------------------------


class HookedEditor(BaselineEditor):
    """An editor acting through hooks on a late FFN's down-projection.

    ``editor.model`` stays the HF model: a forward hook changes the down-projection's
    output (mode ``infer``), so ``model.generate`` uses the edits. A pre-hook on the model
    records each call's attention mask and whether it continues a KV cache, since routing
    is per sequence and must ignore padding.
    """

    settings_class: type = object

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        task: str,
        locality_texts: list[str] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(model, tokenizer, task=task, locality_texts=locality_texts, **settings)
        if task != "causal-lm":
            raise ValueError(f"{self.name} edits causal-lm models only, not {task!r}")
        self.site = LateFFN(model, self.config.layer, self.name)
        self.mode = "infer"  # off | capture | train | infer
        self._store: dict[str, torch.Tensor] = {}
        self._call_mask: torch.Tensor | None = None  # (B, S) real tokens of this call
        self._continuing = False
        self._tail_ok: bool | None = None
        self._handles = [
            model.register_forward_pre_hook(self._on_call, with_kwargs=True),
            self.site.down.register_forward_hook(self._on_down),
        ]

    # -- interface -------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return dict(super().settings(), layer=self.site.index, layer_path=self.site.path)

    def close(self) -> None:
        """Remove the hooks: the model answers as the base model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def is_fixed(self, example: Example) -> bool:
        """Teacher-forced through the whole hooked model: argmax equals every target."""
        with eval_mode(self.model), torch.no_grad(), self._mode("infer"):
            logits = self.site.run(example.inputs)[0]
            logits = logits[example.positions.to(logits.device)]
        return bool((logits.argmax(-1).cpu() == example.targets).all())

    # -- hooks -----------------------------------------------------------------------------
    @contextmanager
    def _mode(self, mode: str) -> Iterator[None]:
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def _on_call(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._call_mask, self._continuing = None, False
            return
        batch, length = int(ids.shape[0]), int(ids.shape[1])
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self._call_mask = mask[:, -length:].bool()
        else:
            self._call_mask = torch.ones(batch, length, dtype=torch.bool)
        # recent transformers pass the KV cache as ``cache``, older ones as ``past_key_values``
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        self._continuing = bool(seen)

    def _call_tokens(self, a: torch.Tensor) -> torch.Tensor:
        """(B, S) real tokens of the current call (all, when the model was not called)."""
        mask = self._call_mask
        if mask is None or tuple(mask.shape) != tuple(a.shape[:2]):
            return torch.ones(a.shape[:2], dtype=torch.bool, device=a.device)
        return mask.to(a.device)

    def _on_down(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.mode == "off" or not isinstance(output, torch.Tensor):
            return None
        a = args[0]
        if self.mode == "capture":
            self._store["act"], self._store["out"] = a.detach(), output.detach()
            return None
        if self.mode == "train":
            return self._train_output(a, output)
        return self._route(a, output)

    @abstractmethod
    def _train_output(self, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The down-projection's output while training (each method's own)."""

    @abstractmethod
    def _route(self, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """The output at inference: routed through the edits, or ``None`` for the base."""

    # -- training helpers ------------------------------------------------------------------
    def _capture(self, enc: dict[str, torch.Tensor]) -> Tail:
        """Record the batch's forward with the down-projection unchanged (mode capture)."""
        self._store = {}
        with eval_mode(self.model), self._mode("capture"):
            tail = self.site.capture(enc, self._store)
        if self._tail_ok is None:
            with eval_mode(self.model), torch.no_grad(), self._mode("off"):
                replayed = self.site.replay(tail)
            scale = float(tail.logits.abs().max()) + 1.0
            self._tail_ok = bool(
                torch.allclose(replayed.float(), tail.logits.float(), atol=1e-4 * scale)
            )
        return tail

    def _logits(
        self, tail: Tail, enc: dict[str, torch.Tensor], positions: torch.Tensor
    ) -> torch.Tensor:
        """Logits (k, V) of row 0 at ``positions`` with the hooks in training mode: from the
        replay, or from the whole model when the replay did not reproduce it."""
        if self._tail_ok:
            return self.site.replay(tail, positions)
        logits = self.site.run(enc)[0]
        return logits[positions.to(logits.device)]


# --------------------------------------------------------------------------------------------
# WISE
# --------------------------------------------------------------------------------------------


@dataclass
class WiseSettings:
    """WISE settings; defaults from the reference's hparams/WISE/llama-7b.yaml.

    Attributes:
        layer: Block whose down-projection gets the side memory; ``None``: the reference's
            relative depth, ``round(27/32 * n_layers)`` (clamped to the last block).
        mask_ratio: Share of ``W'``'s entries a shard trains (random gradient mask).
        edit_lr: SGD learning rate on ``W'``.
        n_iter: Steps per edit (fewer when the reference's early stop fires).
        norm_constraint: ``W'`` is clamped to ``W +- norm_constraint`` after each step
            (``None``: off).
        alpha, beta, gamma: The ``act_margin`` of the yaml: irrelevant text below
            ``alpha``, edit above ``beta``, and above the text by ``gamma``.
        act_ratio: Routing threshold = ``act_ratio`` x the memory's lowest edit score.
        save_freq: Edits per shard (a new gradient mask; the shard is saved after it).
        merge_freq: Edits between TIES merges (a multiple of ``save_freq``).
        merge_alg: Only ``"ties"`` (the yaml's).
        densities: Share of each task vector TIES keeps.
        weights: Total weight of the merged shards.
        retrieve: WISE-Retrieve (route among merged memories, the yaml's choice) or
            WISE-Merge (one merged side memory).
        weight_decay: SGD weight decay (hard-coded 1e-5 in the reference).
        loc_max_tokens: The replayed irrelevant text is cut to this many tokens.
        seed: Seeds the gradient masks and the choice of irrelevant text.
        add_space_before_target: As :func:`encode_edit`.
    """

    layer: int | None = None
    mask_ratio: float = 0.2
    edit_lr: float = 1.0
    n_iter: int = 70
    norm_constraint: float | None = 1.0
    alpha: float = 5.0
    beta: float = 20.0
    gamma: float = 10.0
    act_ratio: float = 0.88
    save_freq: int = 500
    merge_freq: int = 1000
    merge_alg: str = "ties"
    densities: float = 0.53
    weights: float = 1.0
    retrieve: bool = True
    weight_decay: float = 1e-5
    loc_max_tokens: int = 32
    seed: int = 0
    add_space_before_target: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.mask_ratio <= 1:
            raise ValueError("mask_ratio must be in (0, 1]")
        if self.n_iter < 1 or self.save_freq < 1 or self.merge_freq < 1:
            raise ValueError("n_iter, save_freq and merge_freq must be positive")
        if self.merge_freq % self.save_freq:
            raise ValueError("merge_freq must be a multiple of save_freq (as in the reference)")
        if self.merge_alg != "ties":
            raise ValueError(f"merge_alg {self.merge_alg!r}: only 'ties' is implemented")
        if not 0 < self.densities <= 1 or self.act_ratio <= 0 or self.edit_lr <= 0:
            raise ValueError("densities must be in (0, 1]; act_ratio and edit_lr positive")


@dataclass
class SideMemory:
    """A routed side memory: its weight (out, in, float32) and lowest edit score."""

    weight: torch.Tensor
    min_act: float = 1e9


class WiseEditor(HookedEditor):
    """WISE through hooks on the down-projection of a late block (see the module docs)."""

    name = "wise"
    settings_class = WiseSettings
    config: WiseSettings

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        task: str,
        locality_texts: list[str] | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(model, tokenizer, task=task, locality_texts=locality_texts, **settings)
        if not self.locality_texts:
            self.close()
            raise ValueError("WISE needs locality_texts (irrelevant text replayed each step)")
        self.base_weight = self.site.weight.detach().float().clone()
        self.current = SideMemory(self.base_weight.clone())  # W' of the open shard
        self.merged: list[SideMemory] = []  # retrieve: merged memories; merge: at most one
        self.shards: list[SideMemory] = []  # saved shards waiting for the next merge
        self.weight_mask = torch.ones_like(self.base_weight, dtype=torch.bool)
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._running: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- inference ---------------------------------------------------------------------------
    def routed(self) -> list[SideMemory]:
        """The side memories routing chooses from, the open shard last: WISE-Retrieve routes
        merged and saved shards alike, WISE-Merge its one merged memory (the reference)."""
        opened = [self.current] if self.current.min_act < 1e9 else []
        saved = self.shards if self.config.retrieve else []
        return [*self.merged, *saved, *opened]

    def _threshold(self, memory: SideMemory) -> float:
        """The reference's threshold; WISE-Merge shares one over all edits."""
        if self.config.retrieve:
            return memory.min_act * self.config.act_ratio
        return min(m.min_act for m in [self.current, *self.merged]) * self.config.act_ratio

    def score(self, a: torch.Tensor, base_out: torch.Tensor, weight: torch.Tensor):
        """Per token ``||act(a W'^T) - act(a W^T)||`` (the reference's ``euc``) and the
        side memory's output."""
        out = self.site.linear(a, weight)
        act = self.site.act
        return torch.linalg.vector_norm(act(out) - act(base_out.float()), dim=-1), out

    def _route(self, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        memories = self.routed()
        if not memories:
            return None
        tokens = self._call_tokens(a).float()
        scores, outs = [], []
        for memory in memories:
            per_token, out = self.score(a, output, memory.weight.to(a.device))
            scores.append(per_token)
            outs.append(out)
        per_token = torch.stack(scores, -1) * tokens[..., None]  # (B, S, M)
        sums, counts, peaks = per_token.sum(1), tokens.sum(1), per_token.amax(1)
        running = self._running
        if self._continuing and running is not None and running[0].shape == sums.shape:
            sums, counts = sums + running[0], counts + running[1]
            peaks = torch.maximum(peaks, running[2])
        self._running = (sums, counts, peaks)
        seq = torch.where(counts[:, None] > 100, peaks, sums / counts.clamp(min=1)[:, None])
        choice = self._choose(seq.cpu(), memories)
        if bool((choice < 0).all()):
            return None
        result = output.clone()
        for row, pick in enumerate(choice.tolist()):
            if pick >= 0:
                result[row] = outs[pick][row].to(output.dtype)
        return result

    def _choose(self, seq: torch.Tensor, memories: list[SideMemory]) -> torch.Tensor:
        """Per row, as the reference: the open shard if above its threshold, then any
        memory scoring higher than the best so far and above its own threshold."""
        choice = torch.full((seq.shape[0],), -1, dtype=torch.long)
        order = [len(memories) - 1, *range(len(memories) - 1)]  # open shard first
        for row in range(seq.shape[0]):
            best = float(seq[row, order[0]])
            if best >= self._threshold(memories[order[0]]):
                choice[row] = order[0]
            for i in order[1:]:
                value = float(seq[row, i])
                if value > best and value > self._threshold(memories[i]):
                    choice[row], best = i, value
        return choice

    def route_scores(self, text: str) -> tuple[list[float], list[float]]:
        """Each routed memory's activation score for ``text`` (its mean over the tokens, as
        routing sees a prompt) and each memory's threshold: for diagnosing the routing."""
        self._store = {}
        enc = self.tokenizer(text, return_tensors="pt")
        with eval_mode(self.model), torch.no_grad(), self._mode("capture"):
            self.site.run(enc)
        memories = self.routed()
        a, out = self._store["act"], self._store["out"]
        scores = [float(self.score(a, out, m.weight.to(a.device))[0].mean()) for m in memories]
        return scores, [self._threshold(m) for m in memories]

    # -- checkpoints -------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """Every side memory, the open shard's gradient mask and the seeded generator, so a
        resumed run goes on exactly as an uninterrupted one (no edit is replayed)."""
        memories = self._memories()
        tensors = {f"{key}.weight": memory.weight for key, memory in memories.items()}
        tensors |= {
            "weight_mask": self.weight_mask.to(torch.uint8),
            "generator": self._generator.get_state(),
        }
        meta = {
            "num_edits": self.num_edits,
            "min_act": {key: memory.min_act for key, memory in memories.items()},
            "merged": len(self.merged),
            "shards": len(self.shards),
        }
        write_state(directory, tensors, meta)

    def load_state(self, directory: Path) -> None:
        """Load a :meth:`save_state` folder into this (freshly built) editor."""
        tensors, meta = read_state(directory)
        device = self.current.weight.device

        def memory(key: str) -> SideMemory:
            return SideMemory(tensors[f"{key}.weight"].to(device), float(meta["min_act"][key]))

        self.current = memory("current")
        self.merged = [memory(f"merged.{i}") for i in range(int(meta["merged"]))]
        self.shards = [memory(f"shards.{i}") for i in range(int(meta["shards"]))]
        self.weight_mask = tensors["weight_mask"].bool()
        self._generator.set_state(tensors["generator"])
        self.num_edits = int(meta["num_edits"])

    def _memories(self) -> dict[str, SideMemory]:
        """Every side memory by its key in a checkpoint."""
        memories = {"current": self.current}
        memories.update({f"merged.{i}": m for i, m in enumerate(self.merged)})
        memories.update({f"shards.{i}": m for i, m in enumerate(self.shards)})
        return memories

    # -- editing -----------------------------------------------------------------------------
    def _batch(self, example: Example) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The edit (row 0) and one irrelevant text (row 1), right-padded; real tokens."""
        pick = int(torch.randint(len(self.locality_texts), (1,), generator=self._generator))
        loc = self.tokenizer(
            self.locality_texts[pick], truncation=True, max_length=self.config.loc_max_tokens
        )["input_ids"]
        edit = example.inputs["input_ids"][0].tolist()
        width = max(len(edit), len(loc))
        pad = self.tokenizer.pad_token_id
        pad = int(pad if pad is not None else self.tokenizer.eos_token_id)
        ids = torch.full((2, width), pad, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for row, seq in enumerate((edit, loc)):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        return {"input_ids": ids, "attention_mask": mask}, mask.bool()

    def _train_output(self, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        per_token, out = self.score(a, output, self.current.weight)
        self._store["train_scores"] = per_token
        return out.to(output.dtype)

    def _act_loss(self, tokens: torch.Tensor) -> torch.Tensor:
        """The reference's margins on the sequence scores (edit row 0, irrelevant row 1)."""
        per_token = self._store["train_scores"]
        mask = tokens.to(per_token.device).float()
        seq = (per_token * mask).sum(1) / mask.sum(1)
        in_scope, out_scope = seq[:1], seq[1:]
        zero = torch.zeros((), device=seq.device)

        def hinge(x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(-1)
            return x[x > 0].mean() if bool((x > 0).any()) else zero

        pair = out_scope.view(-1, 1) - in_scope + self.config.gamma
        return (
            hinge(pair) + hinge(out_scope - self.config.alpha) + hinge(self.config.beta - in_scope)
        )

    def _step_loss(
        self, tail: Tail, enc: dict[str, torch.Tensor], example: Example, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(tail, enc, example.positions)
        ft = F.cross_entropy(logits.float(), example.targets.to(logits.device))
        return ft, self._act_loss(tokens)

    def _train(self, tail: Tail, enc: dict[str, torch.Tensor], example: Example, tokens):
        cfg = self.config
        weight = self.current.weight.to(self.site.device).requires_grad_(True)
        self.current.weight = weight
        mask = self.weight_mask.to(weight.device)
        base = self.base_weight.to(weight.device)
        optimizer = torch.optim.SGD([weight], lr=cfg.edit_lr, weight_decay=cfg.weight_decay)
        meter, losses = EarlyStop(), []
        with eval_mode(self.model), frozen(self.model), self._mode("train"):
            for _ in range(cfg.n_iter):
                ft, act = self._step_loss(tail, enc, example, tokens)
                loss = ft + act.to(ft.device)
                if meter.stop():
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                weight.grad = weight.grad * mask  # type: ignore[operator]
                optimizer.step()
                meter.update(float(loss.detach()))
                losses.append(round(float(loss.detach()), 5))
                if cfg.norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(
                            torch.clamp(
                                weight, base - cfg.norm_constraint, base + cfg.norm_constraint
                            )
                        )
        self.current.weight = weight.detach()
        return losses

    def _edit_score(self, tail: Tail, tokens: torch.Tensor) -> float:
        """The edit row's activation score with the trained weights."""
        with torch.no_grad():
            per_token, _ = self.score(tail.act, tail.out, self.current.weight)
            mask = tokens.to(per_token.device).float()[:1]
            return float((per_token[:1] * mask).sum() / mask.sum())

    def edit(self, prompt: str, target: str | int) -> EditOutcome:
        start = time.perf_counter()
        example = self.encode(prompt, target)
        cfg = self.config
        if self.num_edits % cfg.save_freq == 0:
            self.weight_mask = torch.rand(self.base_weight.shape, generator=self._generator)
            self.weight_mask = self.weight_mask < cfg.mask_ratio
        enc, tokens = self._batch(example)
        tail = self._capture(enc)
        losses = self._train(tail, enc, example, tokens)
        score = self._edit_score(tail, tokens)
        self.current.min_act = min(self.current.min_act, score)
        self.num_edits += 1
        self._save_and_merge()
        details = {
            "steps": len(losses),
            "losses": losses,
            "edit_score": round(score, 4),
            "threshold": round(self._threshold(self.current), 4)
            if self.current.min_act < 1e9
            else None,
            "memories": len(self.merged),
            "tail": bool(self._tail_ok),
        }
        return EditOutcome(self.is_fixed(example), time.perf_counter() - start, details)

    def _save_and_merge(self) -> None:
        """The reference's ``save_weight`` every ``save_freq`` edits and ``merge_weight``
        every ``merge_freq``."""
        cfg = self.config
        if self.num_edits % cfg.save_freq == 0:
            self.shards.append(self.current)
            self.current = SideMemory(self.base_weight.clone().to(self.current.weight.device))
            if not cfg.retrieve:  # WISE-Merge keeps one activation record over all edits
                self.current.min_act = self.shards[-1].min_act
        if self.num_edits % cfg.merge_freq == 0 and self.shards:
            self._merge()

    def _merge(self) -> None:
        cfg, base = self.config, self.base_weight.to(self.shards[0].weight.device)
        shards, self.shards = self.shards, []
        tensors = [s.weight for s in shards]
        weights = [cfg.weights / len(tensors)] * len(tensors)
        min_act = min(s.min_act for s in shards)
        if cfg.retrieve:
            merged = ties_merge(base, tensors, weights, cfg.densities)
            self.merged.append(SideMemory(merged, min_act))
            return
        if self.merged:  # the reference's 0.4 / 0.6 blend with the earlier merged memory
            weights = [0.4 / len(tensors)] * len(tensors) + [0.6]
            tensors.append(self.merged[0].weight)
            min_act = min(min_act, self.merged[0].min_act)
        self.merged = [SideMemory(ties_merge(base, tensors, weights, cfg.densities), min_act)]
