"""One edit, start to finish: find the wrong tokens, place and train neurons, verify.

The :class:`~tpatcher.Patcher` calls :func:`train_edit_neurons` with everything it needs
passed in, so the editing logic knows nothing of saving, publishing or the memory bank's
origin. What comes back is either nothing (the model was right, or training failed) or
frozen neurons that the caller verifies on the real model before anyone else sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .adapters import VocabRows
from .config import PatcherConfig
from .encoding import Example
from .ffn_site import Capture, FFNSite
from .layer import NewNeurons, PatchLayer
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
class TrainedNeurons:
    """The outcome of training one edit's neurons (``neurons`` is None when nothing is due)."""

    neurons: NewNeurons | None
    outcome: TrainOutcome | None
    memory: torch.Tensor  # the edit's own FFN inputs, for later edits' memory


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


def train_edit_neurons(
    site: FFNSite,
    layer: PatchLayer,
    config: PatcherConfig,
    example: Example,
    memory: torch.Tensor,
    *,
    seed: int,
    beta: float,
    memory_weight: float,
    progress: Progress | None = None,
) -> TrainedNeurons:
    """Capture the edit with the current (thread-visible) patch and train new neurons.

    One neuron per wrongly predicted target position, the first ``max_neurons_per_edit``
    (one for a classifier), initialised on that position's FFN input.
    """
    cap = site.capture(example.inputs, example.positions)
    q_all = cap.q_all.to(torch.promote_types(cap.q_all.dtype, torch.float32))
    own = q_all[example.positions.to(q_all.device)] if site.task == "seq-cls" else q_all
    wrong = wrong_positions(cap, example)
    if len(wrong) == 0:
        return TrainedNeurons(None, None, own.detach().cpu())
    limit = 1 if site.task == "seq-cls" else config.max_neurons_per_edit
    sites = example.positions[wrong[:limit]]
    q_edit = q_all[sites.to(q_all.device)]
    neurons = NewNeurons(
        q_edit.cpu(),
        gated=site.gated,
        has_bias=layer.has_bias,
        activation=layer.activation,
        amplifier_init=config.value_amplifier_init,
        generator=torch.Generator().manual_seed(seed),
    ).to(q_edit.device)
    outcome = train_edit(
        neurons,
        _logits_fn(site, layer, config, example, cap),
        example.targets.to(cap.logits.device),
        q_edit,
        memory.to(device=q_edit.device, dtype=q_edit.dtype),
        config=config,
        beta=beta,
        memory_weight=memory_weight,
        vocab_size=cap.logits.shape[-1],
        progress=progress,
    )
    return TrainedNeurons(neurons, outcome, own.detach().cpu())


def is_right(site: FFNSite, example: Example) -> bool:
    """Whether the model, as this thread sees it, predicts every target (teacher-forced)."""
    with torch.no_grad():
        logits = site.logits_at(site.run(example.inputs), example.positions)
    return bool((logits.argmax(-1).cpu() == example.targets).all())
