"""The Transformer-Patcher objective and the optimisation of one edit's neurons.

``L = L_edit + a L_act + m L_mem`` (Huang et al., 2023, section 3):

* ``L_edit``: cross-entropy of the corrected output (target tokens, or the label);
* ``L_act``: mean of the top-k of ``exp(-s_e)`` over the new neurons' pre-activations on
  the edit, so every new neuron fires on its own input;
* ``L_mem``: per new neuron, the mean of the top-k of ``exp(s_m - beta)`` over memory
  vectors (silent on unrelated inputs) plus the mean of the top-k of
  ``exp(s_m - s_e + gamma)`` (the edit beats every memory input by a margin).

The optimisation is the same whichever way logits are produced: the caller passes a
``logits_fn`` that either replays the cached tail (fast) or runs the whole model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapters import VocabRows
from .config import PatcherConfig
from .errors import TrainingError
from .layer import NewNeurons

#: Exponents are clamped here so one runaway pre-activation cannot overflow to inf.
_MAX_EXPONENT = 60.0
#: Memory candidates kept between full refreshes, as a multiple of ``memory_top_k``.
_CANDIDATE_FACTOR = 4
_REFRESH_EVERY = 10


@dataclass
class TrainOutcome:
    fixed: bool
    steps: int
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)


def _top_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the top-k along dim 0 (per column), averaged over columns."""
    k = min(k, values.shape[0])
    if k == 0:
        return values.new_zeros(())
    return values.topk(k, dim=0).values.mean()


class MemoryCandidates:
    """The memory vectors that can enter the top-k of the memory loss.

    Scoring the whole bank at every step is the cost that grows with the bank; the top-k set
    moves slowly, so every ``_REFRESH_EVERY`` steps the whole bank is scored without
    gradients and the highest ``_CANDIDATE_FACTOR * top_k`` per neuron are kept.
    """

    def __init__(self, bank: torch.Tensor, top_k: int) -> None:
        self.bank = bank
        self.size = _CANDIDATE_FACTOR * top_k
        self.current = bank
        self.exact = bank.shape[0] <= self.size

    def refresh(self, neurons: NewNeurons) -> torch.Tensor:
        """Score the whole bank; returns its maximum pre-activation per neuron."""
        with torch.no_grad():
            scores = neurons.pre_activation(self.bank)
        if not self.exact:
            top = scores.topk(min(self.size, scores.shape[0]), dim=0).indices.flatten().unique()
            self.current = self.bank[top]
        return scores.max(dim=0).values if scores.numel() else scores.new_full((1,), -math.inf)


def patch_losses(
    neurons: NewNeurons,
    logits: torch.Tensor,
    targets: torch.Tensor,
    q_edit: torch.Tensor,
    memory: torch.Tensor,
    *,
    config: PatcherConfig,
    beta: float,
    memory_weight: float,
    floor: torch.Tensor | float = 0.0,
) -> dict[str, torch.Tensor]:
    """All terms of the objective; ``q_edit`` (n, d) holds each new neuron's own FFN input
    and ``floor`` the pre-activation ``L_act`` pushes it above (per neuron, or one value)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    l_edit = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    s_edit = (q_edit * neurons.keys).sum(-1)
    if neurons.biases is not None:
        s_edit = s_edit + neurons.biases
    l_act = _top_mean(torch.exp((floor - s_edit).clamp(max=_MAX_EXPONENT)), config.activation_top_k)
    if memory.shape[0]:
        s_mem = neurons.pre_activation(memory)  # (N, n)
        silent = torch.exp((s_mem - beta).clamp(max=_MAX_EXPONENT))
        margin = torch.exp((s_mem - s_edit + config.margin).clamp(max=_MAX_EXPONENT))
        l_mem = _top_mean(silent, config.memory_top_k) + _top_mean(margin, config.memory_top_k)
    else:
        l_mem = logits.new_zeros(())
    total = l_edit + config.activation_weight * l_act + memory_weight * l_mem
    return {"total": total, "edit": l_edit, "act": l_act, "memory": l_mem, "s_edit": s_edit}


class VocabularyCandidates:
    """The output tokens that the edit loss normalises over between full refreshes.

    Reading the whole output embedding twice per step (forward and backward) dominates a
    step on a large vocabulary. Every ``_REFRESH_EVERY`` steps the full logits are computed
    without gradients and each position's top ``size`` tokens (plus the targets) are kept;
    in between, the cross-entropy is taken over those tokens only. Whether the edit is fixed
    is always decided on the full vocabulary.
    """

    def __init__(self, targets: torch.Tensor, size: int, vocab: int) -> None:
        self.targets = targets
        self.size = size
        self.active = size > 0 and vocab > 4 * size
        self.rows: VocabRows | None = None
        self.local_targets = targets

    def refresh(self, full_logits: torch.Tensor) -> None:
        if not self.active:
            return
        top = full_logits.topk(self.size, dim=-1).indices.flatten()
        rows = torch.cat([top, self.targets.to(top.device)]).unique()  # sorted
        self.rows = VocabRows(rows)
        self.local_targets = torch.searchsorted(rows, self.targets.to(rows.device))

    def confirm(self, logits_fn: LogitsFn, neurons: NewNeurons) -> bool:
        """Whether the targets win on the whole vocabulary; refreshes the rows if not."""
        if self.rows is None:
            return True
        with torch.no_grad():
            full = logits_fn(neurons, None)
        if bool((full.argmax(-1) == self.targets).all()):
            return True
        self.refresh(full)
        return False


LogitsFn = Callable[[NewNeurons, "VocabRows | None"], torch.Tensor]


def train_edit(
    neurons: NewNeurons,
    logits_fn: LogitsFn,
    targets: torch.Tensor,
    q_edit: torch.Tensor,
    memory: torch.Tensor,
    *,
    config: PatcherConfig,
    beta: float,
    memory_weight: float,
    vocab_size: int,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    floor: torch.Tensor | float = 0.0,
) -> TrainOutcome:
    """Optimise ``neurons`` until the edit is fixed and the memory loss stops improving.

    ``logits_fn(neurons, rows)`` returns the logits at the supervised positions, over the
    vocabulary ``rows`` (all of it when ``rows`` is None). Raises :class:`TrainingError` on
    a non-finite loss. ``floor`` is the pre-activation each new neuron is pushed above on
    its edit (per neuron, or one value; 0 is the paper's).
    """
    start = time.perf_counter()
    params = [p for p in neurons.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=config.plateau_factor, patience=config.plateau_patience
    )
    candidates = MemoryCandidates(memory, config.memory_top_k)
    vocab = VocabularyCandidates(targets, config.vocab_candidates, vocab_size)
    best_memory = math.inf
    stale = 0
    losses: dict[str, torch.Tensor] = {}
    fixed = confirmed = False
    step = 0
    for step in range(config.max_steps + 1):
        if step % _REFRESH_EVERY == 0:
            candidates.refresh(neurons)
            if vocab.active:
                with torch.no_grad():
                    vocab.refresh(logits_fn(neurons, None))
        logits = logits_fn(neurons, vocab.rows)
        losses = patch_losses(
            neurons,
            logits,
            vocab.local_targets,
            q_edit,
            candidates.current,
            config=config,
            beta=beta,
            memory_weight=memory_weight,
            floor=floor,
        )
        if not torch.isfinite(losses["total"]):
            raise TrainingError(
                f"the loss became {losses['total'].item()} at step {step}; the edit was not applied"
            )
        fixed = bool((logits.argmax(-1) == vocab.local_targets).all())
        memory_value = float(losses["memory"].detach())
        if progress is not None:
            progress(step, {k: float(v.detach().min()) for k, v in losses.items()})
        if fixed and config.early_stop:
            if memory_value < best_memory * (1 - config.memory_tolerance):
                best_memory, stale = memory_value, 0
            else:
                stale += 1
            if stale >= config.memory_patience or _memory_satisfied(
                neurons, candidates, losses["s_edit"], beta, config.margin, floor
            ):
                if vocab.confirm(logits_fn, neurons):  # decided on the whole vocabulary
                    confirmed = True
                    break
                fixed, stale = False, 0
        if step == config.max_steps:
            break
        _step(optimizer, scheduler, params, losses["total"], config.grad_clip)
    if fixed and not confirmed and vocab.rows is not None:  # early_stop off, or at max_steps
        with torch.no_grad():
            fixed = bool((logits_fn(neurons, None).argmax(-1) == targets).all())
    values = {k: float(v.detach()) for k, v in losses.items() if k != "s_edit"}
    return TrainOutcome(fixed=fixed, steps=step, seconds=time.perf_counter() - start, losses=values)


def _step(optimizer, scheduler, params: list[torch.Tensor], total: torch.Tensor, clip: float):
    """One Adam step on the clipped gradient of ``total``; the plateau schedule follows it."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    scheduler.step(float(total.detach()))


def _memory_satisfied(
    neurons: NewNeurons,
    candidates: MemoryCandidates,
    s_edit: torch.Tensor,
    beta: float,
    margin: float,
    floor: torch.Tensor | float = 0.0,
) -> bool:
    """Every memory pre-activation is below beta and below the edit's minus the margin, and
    every new neuron's pre-activation on its edit is at least ``floor``."""
    floor = torch.as_tensor(floor, dtype=s_edit.dtype, device=s_edit.device)
    if not bool(((s_edit.detach() >= floor) | (floor <= 0)).all()):  # a floor of 0: no check
        return False
    if candidates.bank.shape[0] == 0:
        return True
    with torch.no_grad():
        top = neurons.pre_activation(candidates.current).max(dim=0).values
        if bool(((top < beta) & (top < s_edit - margin)).all()):
            top = candidates.refresh(neurons)  # confirm on the whole bank
            return bool(((top < beta) & (top < s_edit - margin)).all())
    return False
