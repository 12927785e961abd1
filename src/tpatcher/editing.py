"""One edit, start to finish: find the wrong tokens, place and train neurons, verify.

The :class:`~tpatcher.Patcher` calls :func:`train_edit_neurons` with everything it needs
passed in, so the editing logic knows nothing of saving, publishing or the memory bank's
origin. What comes back is either nothing (the model was right, or training failed) or
frozen neurons that the caller verifies on the real model before anyone else sees them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import VocabRows
from .config import PatcherConfig
from .encoding import Example
from .ffn_site import Capture, FFNSite
from .layer import NeuronState, NewNeurons, PatchLayer
from .training import LogitsFn, TrainOutcome, train_edit

Progress = Callable[[int, dict[str, float]], None]


@dataclass
class EditResult:
    """What one call of :meth:`Patcher.edit` did.

    ``success`` is checked with a real forward pass of the patched model before the neurons
    are kept. ``already_correct`` edits change nothing and get no id. ``published`` is false
    for an edit made with ``publish=False`` until :meth:`Patcher.publish`.
    """

    edit_id: str | None
    success: bool
    steps: int
    seconds: float
    neurons: int
    losses: dict[str, float] = field(default_factory=dict)
    already_correct: bool = False
    message: str = ""
    published: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EditRecord:
    """A kept edit: its provenance and the FFN inputs it added to the memory bank."""

    edit_id: str
    prompt: str
    target: str | None
    label: int | None
    created: str
    neurons: int
    memory: torch.Tensor = field(repr=False)
    steps: int = 0
    seconds: float = 0.0
    also: tuple[str, ...] = ()  # other wordings of the prompt trained with it
    subject: str | None = None  # what the edit is about, as the prompt names it
    swapped: tuple[str, ...] = ()  # names swapped for it in the wordings kept in ``memory``

    def to_manifest(self) -> dict[str, Any]:
        extra = {"also": list(self.also)} if self.also else {}
        extra |= {"subject": self.subject} if self.subject is not None else {}
        extra |= {"swapped": list(self.swapped)} if self.swapped else {}
        return extra | {
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
class TrainedNeurons:
    """The outcome of training one edit's neurons (``neurons`` is None when nothing is due)."""

    neurons: NewNeurons | None
    outcome: TrainOutcome | None
    memory: torch.Tensor  # the edit's own FFN inputs, for later edits' memory
    at_targets: torch.Tensor | None = None  # the FFN inputs where the targets are due


def wrong_positions(capture: Capture, example: Example) -> torch.Tensor:
    """Indices (into ``example.positions``) whose greedy token is not the target."""
    return (capture.logits.argmax(-1).cpu() != example.targets).nonzero().flatten()


def _logits_fn(
    site: FFNSite, layer: PatchLayer, config: PatcherConfig, example: Example, cap: Capture
) -> LogitsFn:
    """Logits at the supervised positions for candidate neurons: replayed from the capture
    (``training_loop="cached"``) or from a whole forward pass (``"full"``)."""
    if config.training_loop == "cached":
        q_sup = cap.q.to(torch.promote_types(cap.q.dtype, torch.float32))

        def cached(neurons: NewNeurons, rows: VocabRows | None) -> torch.Tensor:
            return site.replay(cap, neurons(q_sup), rows=rows)

        return cached

    def full(neurons: NewNeurons, rows: VocabRows | None) -> torch.Tensor:
        with layer.training(neurons):
            logits = site.logits_at(site.run(example.inputs), example.positions)
        if rows is None:
            return logits
        return logits.index_select(1, rows.index.to(logits.device))

    return full


def _joint_logits_fn(fns: list[LogitsFn]) -> LogitsFn:
    """The logits of several forms of one edit, stacked (positions of form 1, then 2, ...)."""
    if len(fns) == 1:
        return fns[0]

    def joint(neurons: NewNeurons, rows: VocabRows | None) -> torch.Tensor:
        return torch.cat([fn(neurons, rows) for fn in fns])

    return joint


def train_edit_neurons(
    site: FFNSite,
    layer: PatchLayer,
    config: PatcherConfig,
    examples: list[Example],
    memory: torch.Tensor,
    *,
    seed: int,
    beta: float,
    memory_weight: float,
    progress: Progress | None = None,
    pool: torch.Tensor | None = None,
) -> TrainedNeurons:
    """Capture the edit with the current (thread-visible) patch and train new neurons.

    ``examples`` are surface forms of one edit (the prompt first, then any rewordings that
    must give the same target); they are trained jointly. One neuron per wrongly predicted
    target position, the prompt's first, at most ``max_neurons_per_edit`` (one for a
    classifier), initialised on that position's FFN input. With ``hard_negative_rounds``,
    the inputs of ``pool`` the trained neurons fire on join the memory and training goes on.
    """
    caps = [site.capture(e.inputs, e.positions) for e in examples]
    own, sites, firsts, at_targets = [], [], [], []
    for cap, example in zip(caps, examples, strict=True):
        q_all = cap.q_all.to(torch.promote_types(cap.q_all.dtype, torch.float32))
        positions = example.positions.to(q_all.device)
        at_targets.append(q_all[positions])
        own.append(at_targets[-1] if site.task == "seq-cls" else q_all)
        wrong = wrong_positions(cap, example)
        sites.append(q_all[positions[wrong.to(q_all.device)]])
        firsts.append(wrong == 0)
    memory_of_edit = torch.cat(own).detach().cpu()
    limit = 1 if site.task == "seq-cls" else config.max_neurons_per_edit
    q_edit = torch.cat(sites)[:limit]
    floor = _floors(config, site.task, layer.activation, torch.cat(firsts)[:limit])
    floor = floor.to(q_edit.device, q_edit.dtype)
    if len(q_edit) == 0:
        return TrainedNeurons(None, None, memory_of_edit)
    neurons = NewNeurons(
        q_edit.cpu(),
        gated=site.gated,
        has_bias=layer.has_bias,
        activation=layer.activation,
        amplifier_init=config.value_amplifier_init,
        generator=torch.Generator().manual_seed(seed),
        strength=config.edit_headroom,
    ).to(q_edit.device)
    device = caps[0].logits.device
    pairs = zip(examples, caps, strict=True)
    logits_fns = [_logits_fn(site, layer, config, e, c) for e, c in pairs]
    targets = torch.cat([e.targets.to(device) for e in examples])
    logits_fn = _joint_logits_fn(logits_fns)
    if neurons.strength != 1.0 and site.task != "seq-cls":
        logits_fn, targets = _at_both_strengths(logits_fn), torch.cat([targets, targets])

    def train(bank: torch.Tensor) -> TrainOutcome:
        return train_edit(
            neurons,
            logits_fn,
            targets,
            q_edit,
            bank.to(device=q_edit.device, dtype=q_edit.dtype),
            config=config,
            beta=beta,
            memory_weight=memory_weight,
            vocab_size=caps[0].logits.shape[-1],
            progress=progress,
            floor=floor,
        )

    memory = apart_from(memory, q_edit)
    outcome = train(memory)
    mined = memory[:0]
    if outcome.fixed and pool is not None and len(pool) and config.hard_negative_rounds:
        outcome, mined = _mine_hard_negatives(
            neurons, q_edit, train, outcome, memory, pool, config, beta
        )
    memory_of_edit = torch.cat([memory_of_edit, mined.cpu()])
    return TrainedNeurons(neurons, outcome, memory_of_edit, torch.cat(at_targets))


def apart_from(memory: torch.Tensor, q_edit: torch.Tensor, tolerance: float = 1e-2) -> torch.Tensor:
    """``memory`` without the rows that are the new neurons' own inputs (within ``tolerance``
    of their norm): when the edited text is itself a memory text (one of the bundled chat
    questions, say), a neuron cannot stay silent where it must fire, and training against
    that row would only weaken it."""
    if not len(memory) or not len(q_edit):
        return memory
    nearest = torch.cdist(memory.to(q_edit.device, q_edit.dtype), q_edit).min(dim=1).values
    scale = q_edit.norm(dim=-1).max()
    return memory[(nearest > tolerance * scale).to(memory.device)]


def _floors(config: PatcherConfig, task: str, activation: str, first: torch.Tensor) -> torch.Tensor:
    """Each new neuron's activation floor; ``first`` marks the neurons placed where a
    wording's first target token is due."""
    floor = torch.full(first.shape, config.resolved_activation_floor(task, activation))
    return floor * first if config.floor_first_position_only else floor


def _at_both_strengths(fn: LogitsFn) -> LogitsFn:
    """The logits with the new neurons at their training strength, then at full strength.

    Trained at the lower strength alone, neurons that fire a little on the edit's other
    target positions could tip those at full strength; an edit counts as fixed at both. (A
    classifier's edit has one position, and is verified at full strength afterwards.)
    """

    def both(neurons: NewNeurons, rows: VocabRows | None) -> torch.Tensor:
        weak = fn(neurons, rows)
        strength, neurons.strength = neurons.strength, 1.0
        try:
            full = fn(neurons, rows)
        finally:
            neurons.strength = strength
        return torch.cat([weak, full])

    return both


def _mine_hard_negatives(
    neurons: NewNeurons,
    q_edit: torch.Tensor,
    train: Callable[[torch.Tensor], TrainOutcome],
    first: TrainOutcome,
    memory: torch.Tensor,
    pool: torch.Tensor,
    config: PatcherConfig,
    beta: float,
) -> tuple[TrainOutcome, torch.Tensor]:
    """Rounds of: probe the fixed neurons on ``pool``, add the inputs they fire on (above
    beta, or within the margin of their edit) to the memory, train on. A round that loses
    the fix is undone and ends the mining. Returns the outcome and the inputs added."""
    steps, seconds, losses = first.steps, first.seconds, first.losses
    mined = memory[:0]
    taken = torch.zeros(len(pool), dtype=torch.bool)  # already in the memory: not found twice
    for _ in range(config.hard_negative_rounds):
        with torch.no_grad():
            s_edit = neurons.pre_activation(q_edit).diagonal()
            excess = neurons.pre_activation(pool.to(q_edit.device)) - torch.minimum(
                s_edit - config.margin, s_edit.new_tensor(beta)
            )
            worst = excess.max(dim=1).values.cpu()
        hits = ((worst > 0) & ~taken).nonzero().flatten()
        if len(hits) == 0:
            break
        hits = hits[worst[hits].argsort(descending=True)[: config.memory_top_k]]
        found = pool[hits].to(memory.dtype)
        saved = {k: v.detach().clone() for k, v in neurons.state_dict().items()}
        again = train(torch.cat([memory, mined, found]))
        steps, seconds = steps + again.steps, seconds + again.seconds
        if not again.fixed:
            neurons.load_state_dict(saved)
            break
        losses, mined = again.losses, torch.cat([mined, found])
        taken[hits] = True
    return TrainOutcome(True, steps, seconds, dict(losses, mined=float(len(mined)))), mined


def is_right(site: FFNSite, example: Example) -> bool:
    """Whether the model, as this thread sees it, predicts every target (teacher-forced)."""
    with torch.no_grad():
        logits = site.logits_at(site.run(example.inputs), example.positions)
    return bool((logits.argmax(-1).cpu() == example.targets).all())


@dataclass
class VerifiedEdit:
    """A trained edit that the real model confirmed, ready to be kept (or a refusal)."""

    result: EditResult
    neurons: NeuronState | None = None
    memory: torch.Tensor | None = None


def make_edit(
    site: FFNSite,
    layer: PatchLayer,
    config: PatcherConfig,
    examples: list[Example],
    memory: torch.Tensor,
    *,
    edit_id: str,
    seed: int,
    beta: float,
    memory_weight: float,
    progress: Progress | None = None,
    pool: torch.Tensor | None = None,
) -> VerifiedEdit:
    """Train one edit on top of the state this thread sees and verify it on the real model
    with the new neurons visible to this thread only."""
    start = time.perf_counter()
    trained = train_edit_neurons(
        site, layer, config, examples, memory, seed=seed, beta=beta,
        memory_weight=memory_weight, progress=progress, pool=pool,
    )  # fmt: skip
    if trained.neurons is None or trained.outcome is None:
        message = "the model already gets this right"
        seconds = time.perf_counter() - start
        return VerifiedEdit(EditResult(None, True, 0, seconds, 0, {}, True, message))
    outcome = trained.outcome
    if not outcome.fixed:
        message = f"not fixed within {config.max_steps} steps; no neurons kept"
        return VerifiedEdit(_failed(outcome, start, message))
    neurons = trained.neurons
    frozen = _confirmed(site, layer, config, examples, neurons, trained.at_targets, edit_id)
    if frozen is None:
        message = "trained, but the full model still gets it wrong; no neurons kept"
        return VerifiedEdit(_failed(outcome, start, message))
    losses = dict(outcome.losses)
    if frozen.size < len(neurons.keys):
        losses["dropped"] = float(len(neurons.keys) - frozen.size)
    seconds = time.perf_counter() - start
    result = EditResult(edit_id, True, outcome.steps, seconds, frozen.size, losses)
    return VerifiedEdit(result, frozen, trained.memory)


def _confirmed(
    site: FFNSite,
    layer: PatchLayer,
    config: PatcherConfig,
    examples: list[Example],
    neurons: NewNeurons,
    at_targets: torch.Tensor | None,
    edit_id: str,
) -> NeuronState | None:
    """The trained neurons the real model (this thread only) gets every form right with:
    first without the idle ones (``drop_idle_neurons``), else all; None if neither."""
    frozen = neurons.frozen(edit_id, layer.dtype, layer.device)
    candidates = [frozen]
    if config.drop_idle_neurons and at_targets is not None and frozen.size > 1:
        with torch.no_grad():
            at = at_targets.to(neurons.keys.device, neurons.keys.dtype)
            peak = neurons.output_sizes(at).max(dim=0).values.cpu()
        busy = peak >= config.drop_idle_neurons * peak.max()
        if not busy.all():
            candidates.insert(0, frozen.select(busy))
    for kept in candidates:
        with layer.private(layer.visible_state().concat(kept)):
            if all(is_right(site, e) for e in examples):  # the real model must agree
                return kept
    return None


def _failed(outcome: TrainOutcome, start: float, message: str) -> EditResult:
    seconds = time.perf_counter() - start
    return EditResult(None, False, outcome.steps, seconds, 0, outcome.losses, message=message)
