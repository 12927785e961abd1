"""The last-FFN site: where an editor works, and the replay of everything after it.

Every method tpatcher runs (Transformer-Patcher and each baseline) edits the same place, the
last FFN that the adapter table names. :class:`FFNSite` is the one home of what they need
there: the FFN's modules and hook points, its input device, one forward pass that records
the FFN's inputs and what follows it (:meth:`FFNSite.capture`), and the *replay* that turns
a changed FFN output back into logits without running the model again
(:meth:`FFNSite.replay`). Nothing after the last FFN mixes positions, so the replay is exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .adapters import (
    ArchitectureAdapter,
    VocabRows,
    find_adapter,
    get_submodule,
    resolve_layers_override,
)
from .capture import record
from .errors import UnsupportedModelError

Point = tuple[nn.Module, Literal["input", "output"]]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) for the block, restoring every module's own flag after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` stores its weight as (in, out), the transpose of ``nn.Linear``."""
    return type(module).__name__ == "Conv1D"


def ffn_width(value_proj: nn.Module) -> int:
    """Neurons of an FFN, read off its value (down) projection."""
    weight = value_proj.weight
    return int(weight.shape[0] if is_conv1d(value_proj) else weight.shape[1])


def ffn_hidden_size(value_proj: nn.Module) -> int:
    """The model dimension an FFN writes to, read off its value (down) projection."""
    weight = value_proj.weight
    return int(weight.shape[1] if is_conv1d(value_proj) else weight.shape[0])


def input_device(model: nn.Module) -> torch.device:
    """Where inputs go: the embedding's execution device (accelerate may offload it)."""
    embeddings = model.get_input_embeddings()  # type: ignore[operator]
    hook = getattr(embeddings, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else embeddings.weight.device


@dataclass
class Capture:
    """One forward pass seen from the last FFN (batch dimension dropped).

    ``q_all`` holds the FFN inputs at every position; the other tensors only the supervised
    ``positions``. ``rebuild_from`` is the tensor the block output is rebuilt from (see
    :meth:`ArchitectureAdapter.rebuild`).
    """

    q_all: torch.Tensor  # (L, d)
    q: torch.Tensor  # (k, d)
    ffn_out: torch.Tensor  # (k, d), the FFN output (with any hooks' additions) at capture
    rebuild_from: torch.Tensor  # (k, d)
    logits: torch.Tensor  # (k, V) logits of the whole model at capture


class FFNSite:
    """The last FFN of a model: its modules, a recording forward pass and the exact replay."""

    def __init__(
        self,
        model: PreTrainedModel,
        adapter: ArchitectureAdapter | None = None,
        target_module: str | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter or find_adapter(model)
        self.block_path = (
            resolve_layers_override(self.adapter, model, target_module)
            if target_module
            else self.adapter.block_path(model)
        )
        self.block = get_submodule(model, self.block_path)
        self.task = self.adapter.task
        adapter_ = self.adapter
        self.input_module = get_submodule(self.block, adapter_.ffn_input)
        self.output_module = get_submodule(self.block, adapter_.ffn_output)
        self.key = get_submodule(self.block, adapter_.key_proj)
        self.gate = get_submodule(self.block, adapter_.gate_proj) if adapter_.gate_proj else None
        self.value = get_submodule(self.block, adapter_.value_proj)
        self.norm = get_submodule(self.block, adapter_.norm) if adapter_.norm else None
        #: The FFN's output is normalised on its own before the residual (Gemma).
        self.normed_output = adapter_.recombine == "post-norm-residual"
        if self.value.weight.device.type == "meta":
            raise UnsupportedModelError(
                f"the last FFN ({self.block_path}) is offloaded (its weights are on the 'meta' "
                "device); tpatcher patches and fingerprints the last layer, so it must be "
                "resident: map that layer to a GPU or the CPU without offloading"
            )
        self.ffn_activation = adapter_.activation(model.config)
        self._act = ACT2FN[self.ffn_activation]
        self._fingerprint: str | None = None

    # -- facts ---------------------------------------------------------------------------
    @property
    def gated(self) -> bool:
        return self.adapter.gated

    @property
    def has_bias(self) -> bool:
        return getattr(self.key, "bias", None) is not None

    @property
    def dtype(self) -> torch.dtype:
        return self.value.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.value.weight.device

    @property
    def hidden_size(self) -> int:
        return ffn_hidden_size(self.value)

    @property
    def width(self) -> int:
        """Neurons of the FFN as it is now."""
        return ffn_width(self.value)

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model)

    def fingerprint(self) -> str:
        """SHA-256 of the unpatched last FFN's weights: identifies the base model."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for module in (self.key, self.value, self.gate):
                if module is None:
                    continue
                for tensor in module.state_dict().values():
                    data = tensor.detach().cpu().contiguous()
                    digest.update(str(tuple(data.shape)).encode())
                    digest.update(data.view(torch.uint8).numpy().tobytes())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def fingerprint_parts(self) -> list[nn.Module]:
        """The modules the fingerprint hashes, in order (key, value, gate)."""
        return [m for m in (self.key, self.value, self.gate) if m is not None]

    # -- the FFN with its current weights ------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The FFN's own weights (gate, key, value projections, with biases)."""
        modules = [m for m in (self.gate, self.key, self.value) if m is not None]
        return [p for m in modules for p in m.parameters()]

    def ffn(self, q: torch.Tensor) -> torch.Tensor:
        """The FFN's output for inputs ``q`` with its current weights (no hooks)."""
        if self.gate is None:
            hidden = self._act(self.key(q))
        else:
            hidden = self._act(self.gate(q)) * self.key(q)
        return self.value(hidden)

    # -- forward passes ------------------------------------------------------------------
    def points(self, *, only_q: bool = False) -> dict[str, Point]:
        """Hook points: the FFN input, its output, and what the block output is rebuilt from."""
        points: dict[str, Point] = {"q": (self.input_module, "input")}
        if only_q:
            return points
        points["ffn_out"] = (self.output_module, "output")
        adapter = self.adapter
        if adapter.recombine == "layer-norm":
            points["rebuild_from"] = (get_submodule(self.block, adapter.capture), "input")
        else:
            out = get_submodule(self.block, adapter.capture) if adapter.capture else self.block
            points["rebuild_from"] = (out, "output")
        return points

    def run(self, inputs: dict[str, torch.Tensor]) -> Any:
        """The model on ``inputs`` (moved to the input device), in eval mode."""
        device = self.input_device
        with eval_mode(self.model):
            return self.model(**{k: v.to(device) for k, v in inputs.items()})

    def logits_at(self, output: Any, positions: torch.Tensor, row: int = 0) -> torch.Tensor:
        """Logits (k, V) at ``positions`` of one row (a classifier: its one prediction)."""
        logits = output.logits
        if self.task == "seq-cls":
            return logits[row : row + 1].reshape(1, -1)
        return logits[row, positions.to(logits.device)]

    def capture(self, inputs: dict[str, torch.Tensor], positions: torch.Tensor) -> Capture:
        """One forward pass without gradients, keeping what the replay needs."""
        with torch.no_grad(), record(self.points()) as store:
            output = self.run(inputs)
        pos = positions.to(store["q"].device)
        return Capture(
            q_all=store["q"][0],
            q=store["q"][0, pos],
            ffn_out=store["ffn_out"][0, pos.to(store["ffn_out"].device)],
            rebuild_from=store["rebuild_from"][0, pos.to(store["rebuild_from"].device)],
            logits=self.logits_at(output, positions),
        )

    def ffn_inputs(self, enc: dict[str, torch.Tensor], mask_key: str) -> torch.Tensor:
        """FFN inputs of a padded batch at its real tokens (classifier: position 0), float32."""
        with torch.no_grad(), record(self.points(only_q=True)) as store:
            self.run(enc)
        q = store["q"].float().cpu()
        if self.task == "seq-cls":
            return q[:, 0]
        return q[enc[mask_key].bool()]

    # -- the replay ----------------------------------------------------------------------
    def replay(
        self,
        capture: Capture,
        delta: torch.Tensor | None = None,
        *,
        new_out: torch.Tensor | None = None,
        rows: VocabRows | None = None,
    ) -> torch.Tensor:
        """Logits (k, V or rows) when ``delta`` is added to the captured FFN output, or when
        the FFN outputs ``new_out`` instead; exact because nothing after it mixes positions."""
        if delta is None:
            if new_out is None:
                raise ValueError("replay needs delta or new_out")
            delta = new_out.to(capture.ffn_out.dtype) - capture.ffn_out
        hidden = self.adapter.rebuild(
            self.block,
            capture.rebuild_from.unsqueeze(0),
            capture.ffn_out.unsqueeze(0),
            delta.reshape(capture.ffn_out.shape).to(capture.rebuild_from.dtype).unsqueeze(0),
        )
        logits = self.adapter.head(self.model, hidden, rows)
        return logits.reshape(-1, logits.shape[-1])

    def replay_matches(self, capture: Capture, atol: float = 1e-3) -> bool:
        """Whether recomputing the FFN and replaying reproduces the captured logits here."""
        with torch.no_grad():
            out = self.ffn(capture.q)
            logits = self.replay(capture, new_out=out)
        scale = float(capture.logits.abs().max()) + 1.0
        out_scale = float(capture.ffn_out.abs().max()) + 1.0
        return bool(
            torch.allclose(out.float(), capture.ffn_out.float(), atol=atol * out_scale)
            and torch.allclose(logits.float(), capture.logits.float(), atol=atol * scale)
        )
