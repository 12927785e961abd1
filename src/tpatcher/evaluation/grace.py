"""GRACE (Hartvigsen et al., NeurIPS 2023, arXiv 2211.11031) in the reference's form.

Followed: Thartvigsen/GRACE@grace/editors/grace.py (``GRACE``, ``GRACEAdapter``) with
@grace/config/editor/grace.yaml, and zjunlp/EasyEdit@easyeditor/models/grace/GRACE.py,
@easyeditor/models/grace/grace_main.py, @easyeditor/models/grace/grace_hparams.py and the
defaults of @hparams/GRACE/llama-7b.yaml.

The method: ONE linear layer is wrapped, a late FFN's down-projection (LLaMA-2-7B:
``model.layers[27].mlp.down_proj``; here the same relative depth, ``round(27/32 *
n_layers)``, the helpers of :mod:`.wise`). Its codebook holds (key, value, radius ``eps``,
label) entries. An edit's *query* is the layer's input at the last prompt token (the
reference's ``key_id``). The codebook rules, applied once per edit (the reference's
``iter == 0``): no key, or the nearest key farther than ``eps + its radius``: a new entry
(radius ``eps``); a nearer key of another label: a new entry and both radii set to half
their distance (*split*); of the same label and outside its radius: the radius grows to the
distance (``eps_expand="coverage"``), or the key also moves halfway to the query
(``"moving_average"``). A new value is ``torch.rand`` (``val_init="cold"``, the yamls') or
the layer's output at the query (``"warm"``); the nearest entry's value is then trained with
Adam (``edit_lr``) for ``n_iter`` steps on the edit's cross-entropy, the model's weights
frozen. At inference a query within its nearest key's radius gets that key's value as the
layer's output (``replacement``): at its own token (``replace_last``, EasyEdit's llama
yaml), at every token of the sequence (``replace_all``), or at the tokens before it
(``replace_prompt``, the original repository's yaml; the key token itself is not replaced,
as there). Anything else leaves the layer's output exactly as the base model computes it.
Of keys at the same distance the newest is taken (the reference takes the first): after a
split the midpoint is the new key's, as its radius says, and a conflicting edit whose query
equals an old key exactly wins instead of neither key firing.

Which token is looked up at inference (the choice this module makes): the reference looks
up one token, ``key_id``, which its evaluation sets from the labels (the prompt's last
token) and its ``generate`` resets to "the last token of each call": the prefill looks up
the prompt's last token and each cached decoding step the new token. A forward pass here
carries no labels, so *every* token of a call is looked up, each against the codebook.
This equals the reference's ``generate`` at every step and, for a teacher-forced pass over
``prompt + target``, its lookup at the prompt's last token (that token's query only depends
on the prompt); other tokens replace only where their own query falls within a radius (a
text beginning with an edited prompt is edited there too). It is stateless for
``replace_last``, so ``model.generate`` with a KV cache computes exactly what a
teacher-forced pass does. For the span rules a row's first hit in a call decides; with
``replace_all`` that hit is remembered while a KV cache continues, and later decoding steps
of that row are replaced with the same value, as the teacher-forced pass replaces the
target tokens (the reference's cached decoding would only look up each new token). Tokens
already in a KV cache cannot change, as in the reference.

Departures, and why:

* Training data: the tokens of :func:`encode_edit` (the same as every method) instead of
  the reference's joint tokenisation of ``f"{prompt} {target}"``; the loss is the same
  mean cross-entropy over the target tokens.
* Labels match when the target token ids are equal; the reference compares the float mean
  of its label tensors (prompt positions included as -100), a proxy for that.
* Perturbed value training (``val_train="adv"``, ``num_pert``) and the unused yaml options
  (``dist_fn`` other than Euclidean, ``val_reg``, ``reg``, ``dropout``) are not
  implemented: the yamls train plainly (``sgd``), and the reference implements only the
  Euclidean distance. Distances are exact float32 (no matmul shortcut): a prompt seen again
  at the same length is at distance 0 (at another length, float noise of ~1e-6 apart).
* Causal LMs only (EasyEdit's scope; the original repository also wraps T5 and BERT
  layers): seq2seq and classifiers are refused. The per-token variant at the last FFN,
  method ``grace-tokens`` (:class:`.baselines.GraceTokensEditor`), covers them.
* ``val_init="cold"`` draws from a generator seeded by ``seed``, so runs repeat.
* Training replays the model from the edited block (the blocks' recorded inputs), as
  :mod:`.wise` does: the layers before it do not change, so this is exact (checked once,
  with a full-forward fallback).

As in the reference, every edit updates the codebook and trains ``n_iter`` steps, even when
the model already answers the target; ``locality_texts`` are accepted and unused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..encoding import Example
from ..ffn_site import eval_mode
from .editors import EditOutcome, read_state, write_state
from .wise import HookedEditor, Tail, frozen

__all__ = ["Codebook", "GraceEditor", "GraceSettings"]

REPLACEMENTS = ("replace_last", "replace_all", "replace_prompt")
EXPANSIONS = ("coverage", "moving_average")


@dataclass
class GraceSettings:
    """GRACE settings; defaults from the reference's hparams/GRACE/llama-7b.yaml.

    Attributes:
        layer: Block whose down-projection is wrapped; ``None``: the reference's relative
            depth, ``round(27/32 * n_layers)`` (clamped to the last block).
        edit_lr: Adam learning rate of the trained value.
        n_iter: Training steps per edit (the reference has no early stop).
        eps: Radius of a new key (the yaml's ``eps``), in Euclidean distance between the
            layer's inputs; it is also the reach within which an existing key is expanded
            or split instead of a new key being added.
        eps_expand: ``"coverage"`` (yaml) or ``"moving_average"``.
        replacement: ``"replace_last"`` (EasyEdit's llama yaml), ``"replace_all"`` or
            ``"replace_prompt"`` (the original repository's yaml).
        val_init: ``"cold"`` (yaml: ``torch.rand``) or ``"warm"`` (the layer's output).
        seed: Seeds the cold values.
        add_space_before_target: As :func:`encode_edit`.
    """

    layer: int | None = None
    edit_lr: float = 1.0
    n_iter: int = 50
    eps: float = 1.0
    eps_expand: Literal["coverage", "moving_average"] = "coverage"
    replacement: Literal["replace_last", "replace_all", "replace_prompt"] = "replace_last"
    val_init: Literal["cold", "warm"] = "cold"
    seed: int = 0
    add_space_before_target: bool = True

    def __post_init__(self) -> None:
        if self.replacement not in REPLACEMENTS:
            raise ValueError(f"replacement must be one of {', '.join(REPLACEMENTS)}")
        if self.eps_expand not in EXPANSIONS:
            raise ValueError(f"eps_expand must be one of {', '.join(EXPANSIONS)}")
        if self.val_init not in ("cold", "warm"):
            raise ValueError("val_init must be 'cold' or 'warm'")
        if self.eps < 0 or self.edit_lr <= 0 or self.n_iter < 1:
            raise ValueError("eps must be >= 0, edit_lr positive and n_iter at least 1")


def nearest_keys(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of the nearest of ``keys`` (K, w) for each row of ``queries``
    (n, w). Of keys at the same distance the newest (highest index) wins: a conflicting edit
    whose query equals an older key's exactly (a split at distance 0) then replaces the older
    answer, where a first-index tie-break would leave neither key in reach."""
    dists = torch.cdist(
        queries.float(), keys.to(queries.device), compute_mode="donot_use_mm_for_euclid_dist"
    )
    dist, idx = dists.flip(-1).min(dim=-1)
    return dist, keys.shape[0] - 1 - idx


class Codebook:
    """GRACE's discrete key-value store: keys (K, w), values (K, d), radii (K,), labels."""

    def __init__(self, eps: float, expand: str = "coverage") -> None:
        self.eps = float(eps)
        self.expand = expand
        self.keys = torch.zeros(0, 0)
        self.values = torch.zeros(0, 0)
        self.radii = torch.zeros(0)
        self.labels: list[tuple[int, ...]] = []

    @property
    def size(self) -> int:
        return len(self.labels)

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to and index of the nearest key for each row of ``queries`` (n, w)."""
        return nearest_keys(queries, self.keys)

    def lookup(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``queries``: whether it lies within its nearest key's radius, and that
        key's index."""
        dist, idx = self.nearest(queries)
        return dist <= self.radii.to(dist.device)[idx], idx

    def _add(self, key: torch.Tensor, value: torch.Tensor, label: tuple[int, ...]) -> None:
        key = key.detach().float().reshape(1, -1)
        value = value.detach().float().reshape(1, -1)
        radius = torch.tensor([self.eps], device=key.device)
        if self.size == 0:
            self.keys, self.values, self.radii = key, value.to(key.device), radius
        else:
            self.keys = torch.cat([self.keys, key.to(self.keys.device)])
            self.values = torch.cat([self.values, value.to(self.values.device)])
            self.radii = torch.cat([self.radii, radius.to(self.radii.device)])
        self.labels.append(label)

    def update(self, query: torch.Tensor, value: torch.Tensor, label: tuple[int, ...]) -> str:
        """The reference's rules for one edit's query: ``"new"``, ``"split"``,
        ``"expand"`` or ``"covered"`` (the nearest key already holds it)."""
        if self.size == 0:
            self._add(query, value, label)
            return "new"
        dist_t, idx_t = self.nearest(query.reshape(1, -1))
        dist, idx = float(dist_t[0]), int(idx_t[0])
        if dist > self.eps + float(self.radii[idx]):
            self._add(query, value, label)
            return "new"
        if self.labels[idx] != label:
            self._add(query, value, label)
            self.radii[idx] = dist / 2 - 1e-5
            self.radii[-1] = dist / 2
            return "split"
        if dist <= float(self.radii[idx]):
            return "covered"
        if self.expand == "moving_average":
            q = query.detach().float().reshape(-1).to(self.keys.device)
            self.keys[idx] = 0.5 * self.keys[idx] + 0.5 * q
        self.radii[idx] = dist
        return "expand"


class GraceEditor(HookedEditor):
    """GRACE on one late down-projection, through hooks (see the module docs)."""

    name = "grace"
    settings_class = GraceSettings
    config: GraceSettings

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
        self.codebook = Codebook(self.config.eps, self.config.eps_expand)
        self._generator = torch.Generator().manual_seed(self.config.seed)
        self._train: tuple[torch.Tensor, int] | None = None  # (value, key position)
        self._sticky: torch.Tensor | None = None  # replace_all: (B,) entry per row or -1

    @property
    def size(self) -> int:
        return self.codebook.size

    # -- checkpoints -------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """The codebook (keys, values, radii, labels) and the seeded generator of the value
        initialisation, so a resumed run goes on as an uninterrupted one."""
        book = self.codebook
        tensors = {"keys": book.keys, "values": book.values, "radii": book.radii}
        tensors["generator"] = self._generator.get_state()
        meta = {"edits": self.num_edits, "labels": [list(label) for label in book.labels]}
        write_state(directory, tensors, meta)

    def load_state(self, directory: Path) -> None:
        """Load a :meth:`save_state` folder into this (freshly built) editor."""
        tensors, meta = read_state(directory)
        book, device = self.codebook, self.site.device
        book.keys, book.values = tensors["keys"].to(device), tensors["values"].to(device)
        book.radii = tensors["radii"].to(device)
        book.labels = [tuple(int(t) for t in label) for label in meta["labels"]]
        self._generator.set_state(tensors["generator"])
        self.num_edits = int(meta["edits"])

    # -- inference ---------------------------------------------------------------------------
    def _route(self, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor | None:
        """Every real token of the call is looked up; hits replace per ``replacement``."""
        book = self.codebook
        if book.size == 0:
            self._sticky = None
            return None
        tokens = self._call_tokens(a)
        hit, idx = book.lookup(a.reshape(-1, a.shape[-1]))
        hit = hit.view(tokens.shape) & tokens
        idx = idx.view(tokens.shape)
        if self.config.replacement == "replace_last":
            if not bool(hit.any()):
                return None
            values = book.values.to(output.device, output.dtype)[idx]
            return torch.where(hit[..., None], values, output)
        return self._replace_span(hit, idx, tokens, output)

    def _replace_span(
        self, hit: torch.Tensor, idx: torch.Tensor, tokens: torch.Tensor, output: torch.Tensor
    ) -> torch.Tensor | None:
        """``replace_all``/``replace_prompt``: each row's first hit decides its value."""
        any_hit = hit.any(1)
        first = torch.where(any_hit, hit.int().argmax(1), -1)
        chosen = torch.where(any_hit, idx.gather(1, first.clamp(min=0)[:, None])[:, 0], -1)
        positions = torch.arange(hit.shape[1], device=hit.device)[None]
        if self.config.replacement == "replace_all":
            sticky = self._sticky
            if self._continuing and sticky is not None and sticky.shape == chosen.shape:
                sticky = sticky.to(chosen.device)
                chosen = torch.where(sticky >= 0, sticky, chosen)
            self._sticky = chosen
            span = tokens & (chosen >= 0)[:, None]
        else:
            span = tokens & (positions < first[:, None])
        if not bool(span.any()):
            return None
        values = self.codebook.values.to(output.device, output.dtype)[chosen.clamp(min=0)]
        return torch.where(span[..., None], values[:, None, :], output)

    # -- training ----------------------------------------------------------------------------
    def _train_output(self, a: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The trained value in place of the layer's output in row 0, per ``replacement``."""
        if self._train is None:
            return output
        value, pos = self._train
        out = output.clone()
        value = value.to(out.dtype)
        rule = self.config.replacement
        if rule == "replace_last":
            out[0, pos] = value
        elif rule == "replace_all":
            out[0, :] = value
        else:
            out[0, :pos] = value
        return out

    def _initial_value(self, layer_out: torch.Tensor) -> torch.Tensor:
        if self.config.val_init == "warm":
            return layer_out.detach().float()
        return torch.rand(layer_out.shape[-1], generator=self._generator)

    def _fit(self, tail: Tail, example: Example, entry: int, pos: int) -> list[float]:
        """Adam on the entry's value for ``n_iter`` steps (the reference's loop)."""
        cfg = self.config
        value = self.codebook.values[entry].clone().to(self.site.device).requires_grad_(True)
        optimizer = torch.optim.Adam([value], lr=cfg.edit_lr)
        targets = example.targets
        losses: list[float] = []
        self._train = (value, pos)
        try:
            with eval_mode(self.model), frozen(self.model), self._mode("train"):
                for _ in range(cfg.n_iter):
                    logits = self._logits(tail, example.inputs, example.positions)
                    loss = F.cross_entropy(logits.float(), targets.to(logits.device))
                    if not loss.requires_grad:  # the value cannot reach these logits
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(round(float(loss.detach()), 5))
        finally:
            self._train = None
        self.codebook.values[entry] = value.detach().to(self.codebook.values.device)
        return losses

    def edit(self, prompt: str, target: str | int) -> EditOutcome:
        start = time.perf_counter()
        example = self.encode(prompt, target)
        pos = int(example.positions[0])  # the reference's key_id: the last prompt token
        tail = self._capture(example.inputs)
        query = tail.act[0, pos].float()
        label = tuple(int(t) for t in example.targets.tolist())
        action = self.codebook.update(query, self._initial_value(tail.out[0, pos]), label)
        hit, idx = self.codebook.lookup(query[None])
        entry = int(idx[0])
        losses = self._fit(tail, example, entry, pos) if bool(hit[0]) else []
        self.num_edits += 1
        details = {
            "action": action,
            "entry": entry,
            "steps": len(losses),
            "losses": losses,
            "radius": round(float(self.codebook.radii[entry]), 5),
            "codebook_size": self.size,
            "tail": bool(self._tail_ok),
        }
        return EditOutcome(self.is_fixed(example), time.perf_counter() - start, details)
