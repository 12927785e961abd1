"""The patch neurons added to the last FFN, and the hooks that inject them.

A patch neuron has the same form as the FFN's own neurons: ``phi(k . q + b) v`` for a plain
FFN and ``phi(g . q) (u . q) v`` for a gated one, so neurons can later be folded into the
FFN's weight matrices (:meth:`tpatcher.Patcher.merge`).

Committed neurons live in an immutable :class:`NeuronState` that is swapped in whole, so a
forward pass that started before a swap sees either all of a new edit's neurons or none.
Neurons being trained, and trained edits not yet published, are visible only to the thread
that made them (:meth:`PatchLayer.private`), so a server keeps answering with the published
patch until an edit is verified and durable.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.activations import ACT2FN


@dataclass(frozen=True)
class NeuronState:
    """An immutable set of committed neurons; ``owners[i]`` is the edit id of neuron i."""

    keys: torch.Tensor  # (n, d): the key (plain FFN) or gate key (gated FFN)
    values: torch.Tensor  # (n, d)
    up_keys: torch.Tensor | None = None  # (n, d), gated FFNs only
    biases: torch.Tensor | None = None  # (n,), FFNs whose key projection has a bias
    owners: tuple[str, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return len(self.owners)

    def select(self, keep: torch.Tensor) -> NeuronState:
        """The neurons where ``keep`` (a boolean mask) is true."""
        idx = keep.nonzero().flatten()
        return NeuronState(
            keys=self.keys[idx.to(self.keys.device)],
            values=self.values[idx.to(self.values.device)],
            up_keys=None if self.up_keys is None else self.up_keys[idx.to(self.up_keys.device)],
            biases=None if self.biases is None else self.biases[idx.to(self.biases.device)],
            owners=tuple(self.owners[i] for i in idx.tolist()),
        )

    def owned_by(self, edit_id: str) -> NeuronState:
        """The neurons of one edit."""
        return self.select(torch.tensor([o == edit_id for o in self.owners], dtype=torch.bool))

    def without(self, edit_ids: set[str]) -> NeuronState:
        """Every neuron except those of ``edit_ids``."""
        keep = torch.tensor([o not in edit_ids for o in self.owners], dtype=torch.bool)
        return self.select(keep)

    def concat(self, other: NeuronState) -> NeuronState:
        def cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
            if a is None or b is None:
                return None
            return torch.cat([a, b.to(device=a.device, dtype=a.dtype)])

        return NeuronState(
            keys=cat(self.keys, other.keys),  # type: ignore[arg-type]
            values=cat(self.values, other.values),  # type: ignore[arg-type]
            up_keys=cat(self.up_keys, other.up_keys),
            biases=cat(self.biases, other.biases),
            owners=self.owners + other.owners,
        )


def neuron_hidden(
    q: torch.Tensor,
    keys: torch.Tensor,
    act: nn.Module,
    up_keys: torch.Tensor | None = None,
    biases: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each neuron's coefficient on its value vector for FFN inputs ``q``: (..., n)."""
    pre = q @ keys.T
    if biases is not None:
        pre = pre + biases
    hidden = act(pre)
    return hidden if up_keys is None else hidden * (q @ up_keys.T)


def neuron_output(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    act: nn.Module,
    up_keys: torch.Tensor | None = None,
    biases: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of the neurons' outputs for FFN inputs ``q`` (..., d)."""
    return neuron_hidden(q, keys, act, up_keys, biases) @ values


class NewNeurons(nn.Module):
    """The trainable neurons of one edit, initialised as the paper prescribes.

    ``k = q_e / ||q_e||^2`` (pre-activation exactly 1 on the edit), ``b = 0``, and the value a
    random normal vector scaled by a trainable per-dimension amplifier.
    """

    def __init__(
        self,
        q_edit: torch.Tensor,
        *,
        gated: bool,
        has_bias: bool,
        activation: str,
        amplifier_init: float,
        generator: torch.Generator,
        strength: float = 1.0,
    ) -> None:
        super().__init__()
        n, d = q_edit.shape
        key = q_edit / q_edit.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
        self.keys = nn.Parameter(key.clone())
        self.up_keys = nn.Parameter(key.clone()) if gated else None
        self.biases = nn.Parameter(torch.zeros(n, dtype=q_edit.dtype)) if has_bias else None
        direction = torch.randn(n, d, generator=generator, dtype=torch.float32) / d**0.5
        self.direction = nn.Parameter(direction.to(q_edit.dtype))
        self.amplifier = nn.Parameter(torch.full((n, d), amplifier_init, dtype=q_edit.dtype))
        self.act = ACT2FN[activation]
        self.strength = strength  # while training; committed neurons act at full strength

    @property
    def values(self) -> torch.Tensor:
        return self.direction * self.amplifier

    def pre_activation(self, q: torch.Tensor) -> torch.Tensor:
        """Gate pre-activations (..., n) for FFN inputs ``q``; the losses act on these."""
        pre = q @ self.keys.T
        return pre if self.biases is None else pre + self.biases

    def output_sizes(self, q: torch.Tensor) -> torch.Tensor:
        """How much each neuron adds at full strength at FFN inputs ``q``: (..., n), the norm
        of ``phi(k . q + b) (u . q) v``."""
        hidden = neuron_hidden(q, self.keys, self.act, self.up_keys, self.biases)
        return hidden.abs() * self.values.norm(dim=-1)

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        out = neuron_output(q, self.keys, self.values, self.act, self.up_keys, self.biases)
        return out if self.strength == 1.0 else out * self.strength

    def frozen(self, edit_id: str, dtype: torch.dtype, device: torch.device) -> NeuronState:
        """The trained neurons as committed state (amplifier folded into the values)."""

        def out(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(device=device, dtype=dtype).clone()

        return NeuronState(
            keys=out(self.keys),  # type: ignore[arg-type]
            values=out(self.values),  # type: ignore[arg-type]
            up_keys=out(self.up_keys),
            biases=out(self.biases),
            owners=(edit_id,) * self.keys.shape[0],
        )


class PatchLayer:
    """Injects the committed neurons (and, in the training thread, new ones) into the FFN.

    Attach it with forward hooks rather than by replacing modules, so the patched model stays
    an ordinary ``transformers`` model: ``generate``, ``device_map`` and saving the base weights
    all behave as before.
    """

    def __init__(
        self,
        input_module: nn.Module,
        output_module: nn.Module,
        *,
        activation: str,
        gated: bool,
        has_bias: bool,
        dtype: torch.dtype,
        device: torch.device,
        hidden_size: int,
    ) -> None:
        self.activation = activation
        self.act = ACT2FN[activation]
        self.gated = gated
        self.has_bias = has_bias
        self.dtype = dtype
        self.device = device
        self.hidden_size = hidden_size
        self.enabled = True
        self.state = self.empty_state()
        self._local = threading.local()
        self._modules = (input_module, output_module)
        self._handles: list = []
        self.attach()

    def attach(self) -> None:
        """Hook the neurons into the FFN (done on construction; again after :meth:`remove`)."""
        if self._handles:
            return
        input_module, output_module = self._modules
        if input_module is output_module:
            self._handles.append(output_module.register_forward_hook(self._hook_same))
        else:
            self._handles.append(input_module.register_forward_pre_hook(self._remember_input))
            self._handles.append(output_module.register_forward_hook(self._hook_split))

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    # -- state -----------------------------------------------------------------------------
    def empty_state(self) -> NeuronState:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=self.dtype, device=self.device)

        d = self.hidden_size
        return NeuronState(
            keys=zeros(0, d),
            values=zeros(0, d),
            up_keys=zeros(0, d) if self.gated else None,
            biases=zeros(0) if self.has_bias else None,
        )

    @property
    def num_neurons(self) -> int:
        return self.state.size

    def committed_output(self, q: torch.Tensor, state: NeuronState | None = None) -> torch.Tensor:
        s = self.state if state is None else state
        q = q.to(s.keys.dtype)
        return neuron_output(q, s.keys, s.values, self.act, s.up_keys, s.biases)

    @contextmanager
    def training(self, neurons: NewNeurons) -> Iterator[None]:
        """Make ``neurons`` part of the FFN for forward passes of this thread only."""
        self._local.pending = neurons
        try:
            yield
        finally:
            self._local.pending = None

    @contextmanager
    def private(self, state: NeuronState | None = None, *, enabled: bool = True) -> Iterator[None]:
        """For forward passes of this thread only: use ``state`` instead of the published
        state (``None``: the published one), or the base model when ``enabled`` is false."""
        previous = getattr(self._local, "override", None)
        self._local.override = (state, enabled)
        try:
            yield
        finally:
            self._local.override = previous

    def visible_state(self) -> NeuronState:
        """The committed state as forward passes of this thread see it."""
        override = getattr(self._local, "override", None)
        return override[0] if override is not None and override[0] is not None else self.state

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- hooks -----------------------------------------------------------------------------
    def _delta(self, q: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        override = getattr(self._local, "override", None)
        state = self.state  # read once: a concurrent commit swaps the whole state
        enabled = self.enabled
        if override is not None:
            state = override[0] if override[0] is not None else state
            enabled = override[1]
        if not enabled:
            return output
        pending: NewNeurons | None = getattr(self._local, "pending", None)
        if state.size:
            output = output + self.committed_output(q, state).to(output.dtype)
        if pending is not None:
            output = output + pending(q.to(pending.keys.dtype)).to(output.dtype)
        return output

    def _hook_same(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self._delta(args[0], output)

    def _remember_input(self, module: nn.Module, args: tuple) -> None:
        self._local.q = args[0]

    def _hook_split(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        q = getattr(self._local, "q", None)
        self._local.q = None
        if q is None:
            return output
        return self._delta(q, output)
