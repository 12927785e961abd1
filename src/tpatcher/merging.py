"""Fold patch neurons into the FFN's weight matrices, so the model needs no tpatcher to run.

A patch neuron has the FFN's own form (``phi(k . q + b) v``, or ``phi(g . q) (u . q) v`` when
gated), so where its activation is the FFN's it becomes one more row of the key/gate and up
projections and one more column of the down projection: exact.

ReLU neurons on an FFN whose activation is ``x * F(x)`` with ``F`` going from 0 to 1 (SiLU,
GELU and its tanh forms, quick-GELU) are folded with a scale ``s``: ``act(s x) / s`` tends to
``relu(x)`` as ``s`` grows, so the gate (or key) row and bias are multiplied by ``s`` and the
value column by ``1 / s``. Other pairs cannot be made from the FFN's activation and are refused.

The other helpers pad FFNs with zero neurons (zero key/gate/up rows and zero value columns add
exactly 0), so that every layer has one width that ``config.intermediate_size`` can describe.
Nothing here imports :mod:`tpatcher.patcher`.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .adapters import ArchitectureAdapter, find_adapter, get_submodule
from .errors import UnsupportedModelError
from .ffn_site import FFNSite, ffn_hidden_size, is_conv1d
from .ffn_site import ffn_width as value_width
from .layer import NeuronState, PatchLayer

__all__ = [
    "FFN_WIDTH_CONFIG",
    "default_scale",
    "ffn_width",
    "fold_plan",
    "grow_in",
    "grow_out",
    "merge_into",
    "merged_copy",
    "pad_ffn",
    "relu_gap",
    "round_up",
    "widen_all_layers",
]

#: Names of one function: folding between them is exact.
_SAME_FUNCTION = {"swish": "silu", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new"}

#: Per architecture (adapter name): the config field that holds the FFN width, and every
#: ModuleList of blocks that field describes (T5's ``d_ff`` is shared by encoder and decoder).
FFN_WIDTH_CONFIG: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama": ("intermediate_size", ("model.layers",)),
    "gemma": ("intermediate_size", ("model.layers",)),
    "gpt2": ("n_inner", ("transformer.h",)),
    "t5": ("d_ff", ("encoder.block", "decoder.block")),
    "t5-gated": ("d_ff", ("encoder.block", "decoder.block")),
    "bart": ("decoder_ffn_dim", ("model.decoder.layers",)),
    "bert": ("intermediate_size", ("bert.encoder.layer",)),
}


def _canonical(activation: str) -> str:
    return _SAME_FUNCTION.get(activation, activation)


@functools.cache
def relu_gap(activation: str) -> float | None:
    """``max_y |act(y) - relu(y)|``, or ``None`` when ``act(s x) / s`` does not tend to relu.

    Then ``|act(s x) / s - relu(x)| <= relu_gap / s`` for every ``x``: 0.2785 for SiLU, 0.1700
    for GELU. The gap only occurs where ``|s x|`` is small (a few units), so it is 0 in float32
    for almost every input. Measured on a float64 grid rather than tabulated, so any activation
    of that shape is accepted and any other refused.
    """
    if activation not in ACT2FN:
        return None
    y = torch.linspace(-80.0, 80.0, 320_001, dtype=torch.float64)
    try:
        gap = (ACT2FN[activation](y) - torch.relu(y)).abs()
    except (RuntimeError, TypeError):
        return None
    tail = gap[y.abs() >= 40.0]
    if not torch.isfinite(gap).all() or float(tail.max()) > 1e-9:
        return None
    return float(gap.max())


def default_scale(dtype: torch.dtype) -> float:
    """The scale for ReLU neurons on an ``x * F(x)`` FFN stored in ``dtype``.

    A power of two, so scaling the weights is exact. 2**14 in float32/bfloat16/float64 (per
    neuron error at most 0.28 / 16384 = 1.7e-5 times ``|u . q| |v|``); 2**8 in float16, whose
    range (65504) the scaled pre-activations must stay inside.
    """
    return 2.0**8 if dtype == torch.float16 else 2.0**14


def fold_plan(
    neuron_activation: str, ffn_activation: str, dtype: torch.dtype, scale: float | None = None
) -> float:
    """The scale ``s`` that folds neurons with ``neuron_activation`` into an FFN with
    ``ffn_activation``: 1.0 where they are one function (exact), else the ReLU scale.

    Raises :class:`UnsupportedModelError` for pairs the FFN's activation cannot make.
    """
    if _canonical(neuron_activation) == _canonical(ffn_activation):
        return 1.0
    if neuron_activation == "relu" and relu_gap(ffn_activation) is not None:
        s = default_scale(dtype) if scale is None else float(scale)
        if not (math.isfinite(s) and s >= 1.0):
            raise ValueError(f"scale must be a finite number >= 1, not {scale!r}")
        return s
    raise UnsupportedModelError(
        f"neurons with activation {neuron_activation!r} cannot be folded into an FFN whose "
        f"activation is {ffn_activation!r}: only the FFN's own activation folds exactly, and "
        "ReLU folds (approximately) only into x*F(x)-type FFNs such as SiLU and GELU; keep the "
        "patch directory (and tpatcher) instead, or edit with neuron_activation=None"
    )


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (1 or less: ``n``)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


# -- growing linear maps -------------------------------------------------------------------
def grow_out(module: nn.Module, rows: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Append output units (``rows``: (n, in)) to a linear map; ``bias`` (n,) if it has one."""
    weight = module.weight
    rows = rows.to(device=weight.device, dtype=weight.dtype)
    if is_conv1d(module):
        module.weight = nn.Parameter(torch.cat([weight.data, rows.T], dim=1), requires_grad=False)
        module.nf = module.weight.shape[1]
    else:
        module.weight = nn.Parameter(torch.cat([weight.data, rows], dim=0), requires_grad=False)
        module.out_features = module.weight.shape[0]
    if getattr(module, "bias", None) is not None:
        extra = bias if bias is not None else torch.zeros(rows.shape[0])
        extra = extra.to(device=weight.device, dtype=weight.dtype)
        module.bias = nn.Parameter(torch.cat([module.bias.data, extra]), requires_grad=False)


def grow_in(module: nn.Module, values: torch.Tensor) -> None:
    """Append input units whose output weights are ``values`` (n, out)."""
    weight = module.weight
    values = values.to(device=weight.device, dtype=weight.dtype)
    if is_conv1d(module):
        module.weight = nn.Parameter(torch.cat([weight.data, values], dim=0), requires_grad=False)
    else:
        module.weight = nn.Parameter(torch.cat([weight.data, values.T], dim=1), requires_grad=False)
        module.in_features = module.weight.shape[1]


# -- merging -------------------------------------------------------------------------------
def merge_into(
    model: PreTrainedModel,
    site: FFNSite,
    state: NeuronState,
    activation: str,
    *,
    scale: float | None = None,
) -> PreTrainedModel:
    """Widen ``site``'s FFN in place so ``state``'s neurons become ordinary FFN neurons.

    ``model`` is changed (copy it first to keep the patched one). ``activation`` is the
    neurons'. Same activation as the FFN: exact. ReLU neurons on an ``x * F(x)`` FFN: the
    gate (key) row and bias times ``s``, the value column times ``1 / s`` (``scale``, default
    :func:`default_scale`), giving ``act(s g.q) / s (u.q) v`` for ``relu(g.q) (u.q) v``. Each
    neuron's output then differs by at most ``relu_gap(act) / s * |u.q| * |v|`` (plain FFN:
    ``relu_gap / s * |v|``), and only on inputs with ``|g.q| < ~20 / s``: with the defaults,
    merged logits match the patched model's within 1e-3 in float32.
    """
    if state.size == 0:
        return model
    if state.keys.shape[1] != site.hidden_size:
        raise UnsupportedModelError(
            f"the neurons have {state.keys.shape[1]} inputs but {site.block_path}'s FFN has "
            f"{site.hidden_size}: this patch belongs to another model"
        )
    s = fold_plan(activation, site.ffn_activation, site.dtype, scale)
    keys = state.keys.double() * s
    values = state.values.double() / s
    biases = None if state.biases is None else state.biases.double() * s
    if site.gated:
        if state.up_keys is None:
            raise UnsupportedModelError("a gated FFN's neurons need up keys; this patch has none")
        grow_out(site.gate, keys, biases)  # type: ignore[arg-type]
        grow_out(site.key, state.up_keys, None)
    else:
        grow_out(site.key, keys, biases)
    grow_in(site.value, values)
    return model


def merged_copy(
    model: PreTrainedModel,
    layer: PatchLayer,
    adapter: ArchitectureAdapter,
    block_path: str,
    activation: str,
) -> PreTrainedModel:
    """A plain copy of ``model`` (patched by ``layer``) with the layer's published neurons
    folded into a wider last FFN; ``model`` keeps its patch."""
    layer.remove()
    try:
        merged = copy.deepcopy(model)
    finally:
        layer.attach()
    if not layer.enabled or not layer.state.size:
        return merged
    site = FFNSite(merged, adapter, block_path)
    return merge_into(merged, site, layer.state, activation)


# -- zero neurons ----------------------------------------------------------------------------
def _ffn_modules(block: nn.Module, adapter: ArchitectureAdapter) -> list[nn.Module]:
    """The gate (if any), key and value projections of ``block``'s FFN."""
    names = [adapter.gate_proj, adapter.key_proj, adapter.value_proj]
    return [get_submodule(block, n) for n in names if n is not None]


def pad_ffn(block: nn.Module, adapter: ArchitectureAdapter, width: int) -> int:
    """Widen ``block``'s FFN to ``width`` neurons with zero neurons; returns how many were added.

    A zero neuron's key/gate/up rows, bias and value column are all 0, so it adds exactly 0
    to the output whatever the activation.
    """
    *inputs, value = _ffn_modules(block, adapter)
    current = value_width(value)
    if width < current:
        raise ValueError(f"cannot narrow an FFN of {current} neurons to {width}")
    extra = width - current
    if extra:
        d = ffn_hidden_size(value)
        for module in inputs:
            grow_out(module, torch.zeros(extra, d), None)
        grow_in(value, torch.zeros(extra, d))
    return extra


def ffn_width(block: nn.Module, adapter: ArchitectureAdapter) -> int:
    """Neurons in ``block``'s FFN."""
    return value_width(get_submodule(block, adapter.value_proj))


def _blocks(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    return [block for path in paths for block in get_submodule(model, path)]  # type: ignore[union-attr]


def widen_all_layers(
    model: PreTrainedModel, pad_to: int = 64, adapter: ArchitectureAdapter | None = None
) -> int:
    """Give every FFN that the config's width field describes one width, the widest rounded up
    to ``pad_to``, with zero neurons; set that field; return the width.

    After a merge only the last FFN is wider, which no standard config can say; padding the
    others with zeros changes no output and lets ``from_pretrained`` load the model as it is.
    """
    adapter = adapter or find_adapter(model)
    if adapter.name not in FFN_WIDTH_CONFIG:
        raise UnsupportedModelError(
            f"no config field describes the FFN width of {adapter.name!r} models; supported: "
            f"{', '.join(FFN_WIDTH_CONFIG)}"
        )
    field, paths = FFN_WIDTH_CONFIG[adapter.name]
    blocks = _blocks(model, paths)
    width = round_up(max(ffn_width(b, adapter) for b in blocks), pad_to)
    for block in blocks:
        pad_ffn(block, adapter, width)
    setattr(model.config, field, width)
    return width
