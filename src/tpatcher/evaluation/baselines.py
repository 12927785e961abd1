"""Baseline editors the harness compares Transformer-Patcher with: FT-L, FT+KL, grace-tokens.

All three edit the same place T-Patcher does, the last FFN (:class:`~tpatcher.ffn_site.FFNSite`),
and train on the same tokens (:func:`~tpatcher.encoding.encode_edit`, as
:meth:`Patcher.encode`), so a difference in the results is a difference in the method, not in
the data or the layer.

Training uses the site's *replay*: one forward pass (:meth:`FFNSite.capture`) records the
last FFN's inputs and what its output is recombined with; each step recomputes the FFN
output at the supervised positions and :meth:`FFNSite.replay` turns it into logits. Nothing
after the last FFN mixes positions, so this is exact (checked against the full forward on
first use, with a full-forward fallback) and a step costs a head matmul, not a model pass.
The library and every baseline share this one replay.

* :class:`FTEditor` - FT-L: fine-tune the last FFN's weights on the edit (Meng et al. 2022,
  ROME, appendix "FT-L"; Zhu et al. 2020 for the norm constraint).
* :class:`FTKLEditor` - FT+KL: the same plus a KL penalty to the unedited model on
  locality text (the FT+KL baseline of Huang et al. 2023 and Mitchell et al. 2022).
* :class:`GraceTokensEditor` - ``grace-tokens``: tpatcher's per-token variant of GRACE (a
  discrete key-value codebook with deferral radii, Hartvigsen et al., NeurIPS 2023, "Aging
  with GRACE") at the last FFN. It is not the reference; GRACE in the reference's form is
  :class:`tpatcher.evaluation.grace.GraceEditor` (method ``grace``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..capture import record
from ..encoding import Example, encode_texts, padding_side
from ..ffn_site import Capture, FFNSite, eval_mode
from .editors import BaselineEditor, EditOutcome
from .grace import nearest_keys

__all__ = [
    "FTEditor",
    "FTKLEditor",
    "FTKLSettings",
    "FTSettings",
    "GraceTokensEditor",
    "GraceTokensSettings",
]


# --------------------------------------------------------------------------------------------
# the shared editor machinery
# --------------------------------------------------------------------------------------------


@dataclass
class _Settings:
    seed: int = 0
    add_space_before_target: bool = True


class _SiteEditor(BaselineEditor):
    """An editor that trains something at the last FFN through the site's replay."""

    settings_class: type[_Settings] = _Settings

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
        self.site = FFNSite(model)
        self.adapter = self.site.adapter
        if self.site.task != task:
            raise ValueError(
                f"task {task!r} does not match the model, which is edited as {self.site.task}"
            )
        self._tail_ok: bool | None = None  # whether the replay is exact; checked on first use

    def is_fixed(self, example: Example) -> bool:
        """Teacher-forced: the full model's argmax equals the target at every position."""
        with torch.no_grad():
            logits = self._full_logits(example)
        return bool((logits.argmax(-1).cpu() == example.targets).all())

    # -- helpers ------------------------------------------------------------------------------
    def _full_logits(self, example: Example) -> torch.Tensor:
        """Logits at the supervised positions from a whole forward pass (eval mode)."""
        return self.site.logits_at(self.site.run(example.inputs), example.positions)

    @contextmanager
    def _only_grad(self, params: list[nn.Parameter]) -> Iterator[None]:
        """Gradients for ``params`` only, restoring every ``requires_grad`` flag after."""
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        try:
            self.model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            yield
        finally:
            for p, flag in saved:
                p.requires_grad_(flag)

    def _capture(self, example: Example) -> Capture:
        """One forward pass keeping the last FFN's view of the supervised positions; the
        first one also checks that the replay reproduces the model here."""
        capture = self.site.capture(example.inputs, example.positions)
        if self._tail_ok is None:
            self._tail_ok = self.site.replay_matches(capture)
        return capture

    def _edit_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets.to(logits.device))


# --------------------------------------------------------------------------------------------
# FT-L and FT+KL
# --------------------------------------------------------------------------------------------


@dataclass
class FTSettings(_Settings):
    """FT-L settings.

    Attributes:
        lr: Adam learning rate on the last FFN's weights (ROME's FT-L value); it fixes a
            SmolLM2-135M CounterFact edit in a few steps, 1e-4 takes ~20.
        max_steps: Step budget per edit; training stops as soon as the edit is fixed
            (teacher-forced argmax equals the target), the implicit constraint that keeps
            the change small.
        weight_decay: Adam weight decay (ROME's FT uses 0).
        norm_constraint: ``None`` (default): unconstrained. A float ``c`` clamps every weight
            to ``[w0 - c, w0 + c]`` after each step, ``w0`` being its value before this edit
            (ROME's constrained FT-L, 5e-4 there). Off by default because with early stopping
            it is not needed for locality and at ROME's value it mostly stops edits working.
        train_biases: Also fine-tune the projections' biases (where the FFN has them).
    """

    lr: float = 5e-4
    max_steps: int = 50
    weight_decay: float = 0.0
    norm_constraint: float | None = None
    train_biases: bool = True


@dataclass
class FTKLSettings(FTSettings):
    """FT+KL settings: FT-L's plus the locality penalty.

    Attributes:
        kl_weight: Weight of ``KL(p_unedited || p_edited)`` on locality text in the loss
            ``CE(edit) + kl_weight * KL``.
        kl_batch: Locality texts sampled (seeded) per step.
        kl_pool: At most this many of ``locality_texts`` are used (the first ones); the
            unedited model's distributions on them are computed once, at construction.
        kl_max_tokens: Locality texts are truncated to this many tokens.
    """

    kl_weight: float = 1.0
    kl_batch: int = 4
    kl_pool: int = 32
    kl_max_tokens: int = 32


class FTEditor(_SiteEditor):
    """FT-L: fine-tune the last FFN's weights (key, gate, value projections) on each edit.

    Adam on the edit's cross-entropy, stopping as soon as the edit is fixed. The change is
    kept: later edits fine-tune the already edited weights (sequential editing).
    """

    name = "ft-l"
    settings_class = FTSettings
    config: FTSettings

    def _params(self) -> list[nn.Parameter]:
        params = self.site.parameters()
        if not self.config.train_biases:
            params = [p for p in params if p.dim() > 1]
        return params

    _kl_weight = 0.0

    def _kl(self, step: int, generator: torch.Generator) -> torch.Tensor | None:
        """The locality penalty of this step (none for plain FT-L)."""
        return None

    def edit(self, prompt: str, target: str | int) -> EditOutcome:
        start = time.perf_counter()
        example = self.encode(prompt, target)
        tail = self._capture(example)
        targets = example.targets.to(tail.logits.device)
        if bool((tail.logits.argmax(-1) == targets).all()):
            return EditOutcome(True, time.perf_counter() - start, {"already_correct": True})
        cfg = self.config
        params = self._params()
        originals = [p.detach().clone() for p in params] if cfg.norm_constraint else []
        generator = torch.Generator().manual_seed(cfg.seed + self.num_edits)
        self.num_edits += 1
        losses: list[float] = []
        steps = 0
        with eval_mode(self.model), self._only_grad(params):
            optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            for step in range(cfg.max_steps + 1):
                if self._tail_ok:
                    logits = self.site.replay(tail, new_out=self.site.ffn(tail.q))
                else:
                    logits = self._full_logits(example)
                if bool((logits.argmax(-1) == targets).all()) or step == cfg.max_steps:
                    break
                loss = self._edit_loss(logits, targets)
                kl = self._kl(step, generator)
                total = loss if kl is None else loss + self._kl_weight * kl
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                if cfg.norm_constraint:
                    with torch.no_grad():
                        for p, p0 in zip(params, originals, strict=True):
                            p.copy_(
                                torch.clamp(p, p0 - cfg.norm_constraint, p0 + cfg.norm_constraint)
                            )
                losses.append(round(float(total.detach()), 5))
                steps += 1
            del optimizer
        for p in params:
            p.grad = None
        success = self.is_fixed(example)
        details = {"steps": steps, "losses": losses, "tail": bool(self._tail_ok)}
        return EditOutcome(success, time.perf_counter() - start, details)


@dataclass
class _LocalityItem:
    tail: Capture
    ref_logp: torch.Tensor  # (n, V) the unedited model's log-probabilities


class FTKLEditor(FTEditor):
    """FT+KL: FT-L plus ``kl_weight * KL(unedited || edited)`` on sampled locality text.

    The unedited model's distributions are computed once, at construction, on the first
    ``kl_pool`` locality texts (every token position, or the classifier's position), so the
    reference stays the original model through a sequence of edits.
    """

    name = "ft+kl"
    settings_class = FTKLSettings
    config: FTKLSettings

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
        texts = [t for t in self.locality_texts if t and t.strip()][: self.config.kl_pool]
        if not texts:
            raise ValueError("FT+KL needs locality_texts (text the edit must not change)")
        self._kl_weight = self.config.kl_weight
        self._locality = self._capture_texts(texts)

    def _capture_texts(self, texts: list[str], batch_size: int = 8) -> list[_LocalityItem]:
        """The last FFN's view of each text, and the unedited model's distributions there.

        Texts run in right-padded batches (:func:`encode_texts`, as T-Patcher's memory);
        only real tokens are kept (every position, or the classifier's position 0).
        """
        items: list[_LocalityItem] = []
        points = self.site.points()
        with padding_side(self.tokenizer, "right"):
            for i in range(0, len(texts), batch_size):
                batch = texts[i : i + batch_size]
                enc = encode_texts(
                    self.tokenizer, self.model, batch, self.task, self.config.kl_max_tokens
                )
                with torch.no_grad(), record(points) as store:
                    output = self.site.run(enc)
                mask = enc["attention_mask"].bool()
                for row in range(len(batch)):
                    keep = (
                        torch.tensor([0]) if self.task == "seq-cls" else mask[row].nonzero()[:, 0]
                    )
                    capture = Capture(
                        q_all=store["q"][row],
                        q=store["q"][row, keep.to(store["q"].device)],
                        ffn_out=store["ffn_out"][row, keep.to(store["ffn_out"].device)],
                        rebuild_from=store["rebuild_from"][
                            row, keep.to(store["rebuild_from"].device)
                        ],
                        logits=self.site.logits_at(output, keep, row),
                    )
                    ref = F.log_softmax(capture.logits.float(), dim=-1)
                    items.append(_LocalityItem(capture, ref))
        return items

    def _kl(self, step: int, generator: torch.Generator) -> torch.Tensor | None:
        pool = self._locality
        count = min(self.config.kl_batch, len(pool))
        chosen = torch.randperm(len(pool), generator=generator)[:count].tolist()
        terms = []
        for i in chosen:
            item = pool[i]
            logits = self.site.replay(item.tail, new_out=self.site.ffn(item.tail.q))
            logp = F.log_softmax(logits.float(), dim=-1)
            kl = (item.ref_logp.exp() * (item.ref_logp - logp)).sum(-1)
            terms.append(kl)
        return torch.cat(terms).mean()


# --------------------------------------------------------------------------------------------
# GRACE
# --------------------------------------------------------------------------------------------


@dataclass
class GraceTokensSettings(_Settings):
    """``grace-tokens`` settings (the GRACE paper's defaults where it has one).

    Attributes:
        eps_init: Deferral radius of a new key, in Euclidean distance between last-FFN
            inputs. The paper's default is 1.0; on SmolLM2-135M those inputs have norm ~9.6
            and unrelated prompts lie 4-7 apart, so 1.0 catches the edit and near-copies only.
        lr: Adam learning rate of a new value (paper: 1.0).
        max_steps: Step budget for training a value (paper: 100 iterations); training stops
            early once the edit is fixed.
        expand: What a key of the same label does when a new query falls in its reach:
            ``"coverage"`` (paper default) grows its radius to the query's distance;
            ``"moving_average"`` also moves the key halfway to the query.
    """

    eps_init: float = 1.0
    lr: float = 1.0
    max_steps: int = 100
    expand: Literal["coverage", "moving_average"] = "coverage"


class GraceTokensEditor(_SiteEditor):
    """``grace-tokens``: tpatcher's per-token variant of GRACE at the last FFN, not the
    reference (that is :class:`tpatcher.evaluation.grace.GraceEditor`, method ``grace``).

    A codebook of (key, value, radius) entries that replaces the last FFN's output.

    Keys are last-FFN inputs; a position whose input lies within an entry's radius of its
    key (the nearest key is the one checked) gets that entry's value as the FFN output;
    every other position is left exactly as the base model computes it. The model's weights
    are never changed.

    Where the paper keys an edit on the last prompt token, a T-token target here adds one
    entry per teacher-forced position (the last prompt token, then each target token but
    the last), each keyed on that position's input and labelled with the token it predicts;
    the codebook rules (new key / expand / split) apply entry by entry. Replacement is per
    position and stateless, so ``generate`` with a KV cache reproduces the edit. For a
    single-token target or a classifier this is exactly the paper's method.
    """

    name = "grace-tokens"
    settings_class = GraceTokensSettings
    config: GraceTokensSettings

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
        self.keys = torch.zeros(0, 0)
        self.values: list[torch.Tensor] = []
        self.radii: list[float] = []
        self.labels: list[int] = []
        self._enabled = True
        self._override: tuple[torch.Tensor, torch.Tensor] | None = None  # (positions, values)
        self._q: torch.Tensor | None = None
        self._handles = [
            self.site.input_module.register_forward_pre_hook(self._remember),
            self.site.output_module.register_forward_hook(self._replace),
        ]

    # -- the codebook at inference -----------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.values)

    def close(self) -> None:
        """Remove the hooks: the model answers as the base model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _remember(self, module: nn.Module, args: tuple) -> None:
        self._q = args[0]

    def _nearest(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Distance to and index of the nearest key for each row of ``q`` (n, d); ties go
        to the newest key, as in ``grace``."""
        return nearest_keys(q, self.keys)

    def _replace(self, module: nn.Module, args: tuple, output: Any) -> Any:
        q, self._q = self._q, None
        if not self._enabled or q is None or not isinstance(output, torch.Tensor):
            return None
        if self._override is not None:
            positions, values = self._override
            output = output.clone()
            output[0, positions] = values.to(output.dtype)
            return output
        if not self.values:
            return None
        flat = q.reshape(-1, q.shape[-1])
        dist, idx = self._nearest(flat)
        radii = torch.tensor(self.radii, device=dist.device)
        hit = dist <= radii[idx]
        if not bool(hit.any()):
            return None
        values = torch.stack([v.detach() for v in self.values]).to(output.device, output.dtype)
        replaced = torch.where(
            hit.view(*output.shape[:-1], 1), values[idx].view(output.shape), output
        )
        return replaced

    @contextmanager
    def _disabled(self) -> Iterator[None]:
        self._enabled = False
        try:
            yield
        finally:
            self._enabled = True

    # -- editing ------------------------------------------------------------------------------
    def _add(self, key: torch.Tensor, value: torch.Tensor, label: int) -> int:
        key = key.detach().float().reshape(1, -1).cpu()
        self.keys = key if self.size == 0 else torch.cat([self.keys, key])
        self.values.append(value.detach().clone())
        self.radii.append(float(self.config.eps_init))
        self.labels.append(label)
        return self.size - 1

    def _update_codebook(self, query: torch.Tensor, init_value: torch.Tensor, label: int) -> None:
        """The paper's rules for one (query, label): new key, expand, or split."""
        if self.size == 0:
            self._add(query, init_value, label)
            return
        dist_t, idx_t = self._nearest(query.reshape(1, -1).cpu())
        dist, idx = float(dist_t[0]), int(idx_t[0])
        if dist > self.config.eps_init + self.radii[idx]:
            self._add(query, init_value, label)
        elif self.labels[idx] != label:
            self._add(query, init_value, label)
            self.radii[idx] = dist / 2 - 1e-5
            self.radii[-1] = dist / 2
        elif dist > self.radii[idx]:
            if self.config.expand == "moving_average":
                self.keys[idx] = 0.5 * self.keys[idx] + 0.5 * query.detach().float().cpu()
            self.radii[idx] = dist

    def edit(self, prompt: str, target: str | int) -> EditOutcome:
        start = time.perf_counter()
        example = self.encode(prompt, target)
        with self._disabled():
            tail = self._capture(example)  # base-model FFN outputs: the tail's raw parts
        targets = example.targets.to(tail.logits.device)
        if self.is_fixed(example):
            return EditOutcome(True, time.perf_counter() - start, {"already_correct": True})
        before = self.size
        for j in range(len(targets)):
            self._update_codebook(tail.q[j], tail.ffn_out[j], int(targets[j]))
        _, chosen = self._nearest(tail.q.float().cpu())
        entries = sorted(set(chosen.tolist()))
        params = [self.values[i].clone().float().requires_grad_(True) for i in entries]
        slot = torch.tensor([entries.index(i) for i in chosen.tolist()])
        cfg = self.config
        losses: list[float] = []
        steps = 0
        with eval_mode(self.model), self._only_grad([]):
            optimizer = torch.optim.Adam(params, lr=cfg.lr)
            for step in range(cfg.max_steps + 1):
                values = torch.stack(params)[slot]
                if self._tail_ok:
                    logits = self.site.replay(tail, new_out=values)
                else:
                    self._override = (example.positions, values)
                    try:
                        logits = self._full_logits(example)
                    finally:
                        self._override = None
                if bool((logits.argmax(-1) == targets).all()) or step == cfg.max_steps:
                    break
                loss = self._edit_loss(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(round(float(loss.detach()), 5))
                steps += 1
        dtype = tail.ffn_out.dtype
        for i, p in zip(entries, params, strict=True):
            self.values[i] = p.detach().to(dtype)
        success = self.is_fixed(example)
        details = {
            "steps": steps,
            "losses": losses,
            "new_keys": self.size - before,
            "codebook_size": self.size,
            "tail": bool(self._tail_ok),
        }
        return EditOutcome(success, time.perf_counter() - start, details)

    def settings(self) -> dict[str, Any]:
        return dict(super().settings(), layer=f"{self.site.block_path} FFN")
