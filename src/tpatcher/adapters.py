"""The table of architectures: where each one's last FFN is and what follows it.

This module is the only place that knows module names of particular architectures. An
:class:`ArchitectureAdapter` says

* where the last FFN is (its input module, whose first input is the FFN input ``q``, and its
  output module, whose output receives the patch),
* the FFN's neuron form (gated or not, with or without a bias, which activation), so patch
  neurons take the same form and can be folded into the weights,
* how the last block's output is rebuilt when the FFN output changes (``recombine``) and how
  the head turns that into logits (``head``): together the *tail* that the fast, cached
  training loop replays instead of running the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .errors import UnsupportedModelError

Task = Literal["causal-lm", "seq2seq", "seq-cls"]
Recombine = Literal["residual", "post-norm-residual", "layer-norm"]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` that also accepts negative indices (``model.layers.-1``)."""
    module = root
    for part in path.split("."):
        if part.lstrip("-").isdigit():
            module = module[int(part)]  # type: ignore[index]
        else:
            module = getattr(module, part)
    return module


class VocabRows:
    """A subset of the output vocabulary; slices of the head's weights are taken once.

    ``take`` caches by tensor identity, so it is only for long-lived tensors (weights).
    """

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        self._slices: dict[int, torch.Tensor] = {}

    def take(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        key = id(tensor) * 8 + dim
        if key not in self._slices:
            self._slices[key] = tensor.index_select(dim, self.index.to(tensor.device))
        return self._slices[key]


def _output_logits(
    model: PreTrainedModel, features: torch.Tensor, rows: VocabRows | None
) -> torch.Tensor:
    """The output embedding applied to ``features``, for vocabulary ``rows`` only if given."""
    head = model.get_output_embeddings()
    weight = head.weight if rows is None else rows.take(head.weight)
    bias = getattr(head, "bias", None)
    if bias is not None and rows is not None:
        bias = rows.take(bias)
    return torch.nn.functional.linear(features.to(weight.dtype), weight, bias)


def _llama_logits(model: PreTrainedModel, hidden: torch.Tensor, rows: VocabRows | None):
    logits = _output_logits(model, model.model.norm(hidden), rows)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _gpt2_logits(model: PreTrainedModel, hidden: torch.Tensor, rows: VocabRows | None):
    return _output_logits(model, model.transformer.ln_f(hidden), rows)


def _t5_logits(model: PreTrainedModel, hidden: torch.Tensor, rows: VocabRows | None):
    hidden = model.decoder.final_layer_norm(hidden)
    scale = getattr(model.config, "scale_decoder_outputs", model.config.tie_word_embeddings)
    if scale:
        hidden = hidden * (model.config.d_model**-0.5)
    return _output_logits(model, hidden, rows)


def _bart_logits(model: PreTrainedModel, hidden: torch.Tensor, rows: VocabRows | None):
    bias = model.final_logits_bias[0].to(hidden.device)
    return _output_logits(model, hidden, rows) + (bias if rows is None else rows.take(bias))


def _bert_logits(model: PreTrainedModel, hidden: torch.Tensor, rows: VocabRows | None):
    # ``hidden`` holds the [CLS] position only: (batch, 1, hidden); the label set is small.
    pooled = model.bert.pooler(hidden)
    return model.classifier(model.dropout(pooled))


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Everything tpatcher needs to know about one family of architectures.

    Paths are relative to the last block (``layers.-1``) unless said otherwise.
    """

    name: str
    model_types: tuple[str, ...]
    task: Task
    layers: str  # from the model to the ModuleList of blocks holding the last FFN
    ffn_input: str  # first positional input of this module is the FFN input q
    ffn_output: str  # output of this module receives the patch output
    value_proj: str  # the FFN's output projection (folded values go here)
    key_proj: str  # the FFN's key projection (the "up" projection of a gated FFN)
    gate_proj: str | None  # the gate projection of a gated FFN
    activation: Callable[[PretrainedConfig], str]
    recombine: Recombine
    # residual: the block output; layer-norm: the input of ``norm``; post-norm-residual: the
    # block output, with ``norm`` the post-FFN norm applied to the FFN output.
    capture: str
    norm: str | None
    # logits from the last block's output; ``rows`` restricts them to part of the vocabulary
    head: Callable[[PreTrainedModel, torch.Tensor, VocabRows | None], torch.Tensor]

    @property
    def gated(self) -> bool:
        return self.gate_proj is not None

    def last_block(self, model: nn.Module) -> nn.Module:
        return get_submodule(model, f"{self.layers}.-1")

    def block_path(self, model: nn.Module) -> str:
        blocks = get_submodule(model, self.layers)
        return f"{self.layers}.{len(blocks) - 1}"  # type: ignore[arg-type]

    def rebuild(
        self,
        block: nn.Module,
        captured: torch.Tensor,
        ffn_out: torch.Tensor,
        delta: torch.Tensor,
    ) -> torch.Tensor:
        """The last block's output when ``delta`` is added to the FFN output."""
        if self.recombine == "residual":
            return captured + delta
        norm = get_submodule(block, self.norm)  # type: ignore[arg-type]
        if self.recombine == "layer-norm":
            return norm(captured + delta)
        return captured - norm(ffn_out) + norm(ffn_out + delta)


def _act(attr: str, default: str) -> Callable[[PretrainedConfig], str]:
    return lambda config: str(getattr(config, attr, None) or default)


def _t5_act(config: PretrainedConfig) -> str:
    return str(getattr(config, "dense_act_fn", "relu"))


_LLAMA_LIKE = dict(
    task="causal-lm",
    layers="model.layers",
    ffn_input="mlp",
    ffn_output="mlp",
    value_proj="mlp.down_proj",
    key_proj="mlp.up_proj",
    gate_proj="mlp.gate_proj",
    capture="",
    norm=None,
    head=_llama_logits,
)

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        activation=_act("hidden_act", "silu"),
        recombine="residual",
        **_LLAMA_LIKE,  # type: ignore[arg-type]
    ),
    ArchitectureAdapter(
        name="gemma",
        model_types=("gemma3_text", "gemma2"),
        activation=_act("hidden_activation", "gelu_pytorch_tanh"),
        recombine="post-norm-residual",
        **{**_LLAMA_LIKE, "norm": "post_feedforward_layernorm"},  # type: ignore[arg-type]
    ),
    ArchitectureAdapter(
        name="gpt2",
        model_types=("gpt2",),
        task="causal-lm",
        layers="transformer.h",
        ffn_input="mlp",
        ffn_output="mlp",
        value_proj="mlp.c_proj",
        key_proj="mlp.c_fc",
        gate_proj=None,
        activation=_act("activation_function", "gelu_new"),
        recombine="residual",
        capture="",
        norm=None,
        head=_gpt2_logits,
    ),
    ArchitectureAdapter(
        name="t5",
        model_types=("t5", "mt5"),
        task="seq2seq",
        layers="decoder.block",
        ffn_input="layer.-1.DenseReluDense",
        ffn_output="layer.-1.DenseReluDense",
        value_proj="layer.-1.DenseReluDense.wo",
        key_proj="layer.-1.DenseReluDense.wi",
        gate_proj=None,
        activation=_t5_act,
        recombine="residual",
        capture="layer.-1",
        norm=None,
        head=_t5_logits,
    ),
    ArchitectureAdapter(
        name="t5-gated",
        model_types=(),  # chosen for t5 configs with is_gated_act (T5 v1.1, Flan-T5)
        task="seq2seq",
        layers="decoder.block",
        ffn_input="layer.-1.DenseReluDense",
        ffn_output="layer.-1.DenseReluDense",
        value_proj="layer.-1.DenseReluDense.wo",
        key_proj="layer.-1.DenseReluDense.wi_1",
        gate_proj="layer.-1.DenseReluDense.wi_0",
        activation=_t5_act,
        recombine="residual",
        capture="layer.-1",
        norm=None,
        head=_t5_logits,
    ),
    ArchitectureAdapter(
        name="bart",
        model_types=("bart",),
        task="seq2seq",
        layers="model.decoder.layers",
        ffn_input="fc1",
        ffn_output="fc2",
        value_proj="fc2",
        key_proj="fc1",
        gate_proj=None,
        activation=_act("activation_function", "gelu"),
        recombine="layer-norm",
        capture="final_layer_norm",
        norm="final_layer_norm",
        head=_bart_logits,
    ),
    ArchitectureAdapter(
        name="bert",
        model_types=("bert",),
        task="seq-cls",
        layers="bert.encoder.layer",
        ffn_input="intermediate",
        ffn_output="output.dense",
        value_proj="output.dense",
        key_proj="intermediate.dense",
        gate_proj=None,
        activation=_act("hidden_act", "gelu"),
        recombine="layer-norm",
        capture="output.LayerNorm",
        norm="output.LayerNorm",
        head=_bert_logits,
    ),
)


def find_adapter(model: PreTrainedModel) -> ArchitectureAdapter:
    """The adapter for ``model``, or a clear error listing what is supported."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in ("t5", "mt5") and getattr(model.config, "is_gated_act", False):
        return next(a for a in ADAPTERS if a.name == "t5-gated")
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if adapter.task == "seq-cls" and not hasattr(model, "classifier"):
                raise UnsupportedModelError(
                    f"{type(model).__name__}: a {model_type} encoder is edited as a sequence "
                    "classifier; load it with AutoModelForSequenceClassification"
                )
            if adapter.task != "seq-cls" and model.get_output_embeddings() is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has no language-model head; load the model with "
                    "its generation head (for example AutoModelForCausalLM)"
                )
            return adapter
    supported = sorted({t for a in ADAPTERS for t in a.model_types})
    raise UnsupportedModelError(
        f"architecture {model_type!r} ({type(model).__name__}) is not supported; "
        f"supported model types: {', '.join(supported)}"
    )


def resolve_layers_override(adapter: ArchitectureAdapter, model: nn.Module, target: str) -> str:
    """Check a user's ``target_module`` override and return it as a block path.

    The override names the FFN module of the block to patch (``model.layers.29.mlp``) or the
    block itself; the neuron form and tail still come from the adapter.
    """
    try:
        module = get_submodule(model, target)
    except (AttributeError, IndexError, TypeError) as exc:
        raise UnsupportedModelError(
            f"target_module {target!r} does not exist in the model"
        ) from exc
    blocks = get_submodule(model, adapter.layers)
    for index, block in enumerate(blocks):  # type: ignore[arg-type]
        if block is module or any(m is module for m in block.modules()):
            if index != len(blocks) - 1:  # type: ignore[arg-type]
                raise UnsupportedModelError(
                    f"target_module {target!r} is in block {index}; Transformer-Patcher "
                    "patches the last FFN only (nothing may come after it but the head), "
                    f"which is in block {len(blocks) - 1}"  # type: ignore[arg-type]
                )
            return f"{adapter.layers}.{index}"
    raise UnsupportedModelError(
        f"target_module {target!r} is not inside {adapter.layers}; name the last FFN module"
    )
