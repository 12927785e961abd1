"""``drop_idle_neurons``: a trained neuron that adds next to nothing on its own edit is left
out of the committed patch when the edit holds without it, and kept when it does not."""

from __future__ import annotations

import pytest
import torch
from test_core import PROMPT
from tiny import MEMORY_TEXTS, make_model, make_tokenizer

from tpatcher import Patcher, PatcherConfig, editing
from tpatcher.layer import NewNeurons

TARGET = "berlin paris house good"  # four target tokens: four neurons on the tiny model


def _patcher(drop: float) -> Patcher:
    config = PatcherConfig(drop_idle_neurons=drop, seed=0)
    return Patcher(make_model("llama"), make_tokenizer("llama"), config, memory_texts=MEMORY_TEXTS)


def _with_idle_neuron(neurons: NewNeurons) -> NewNeurons:
    """The trained neurons and one more whose key is zero: silent everywhere, its own edit
    included, as a neuron that training left idle is there."""
    n, d = neurons.keys.shape
    q = torch.cat([neurons.keys.detach(), torch.ones(1, d, dtype=neurons.keys.dtype)])
    grown = NewNeurons(
        q, gated=neurons.up_keys is not None, has_bias=neurons.biases is not None,
        activation="relu", amplifier_init=10.0, generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    with torch.no_grad():
        for name, mine in neurons.named_parameters():
            getattr(grown, name)[:n] = mine
        grown.keys[n] = 0.0
        if grown.up_keys is not None:
            grown.up_keys[n] = 1.0
    grown.act = neurons.act
    return grown


@pytest.fixture
def idle_neuron(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every edit's trained neurons come with one idle neuron."""
    train = editing.train_edit_neurons

    def train_and_add(*args, **kwargs) -> editing.TrainedNeurons:
        trained = train(*args, **kwargs)
        if trained.neurons is not None:
            trained.neurons = _with_idle_neuron(trained.neurons)
        return trained

    monkeypatch.setattr(editing, "train_edit_neurons", train_and_add)


def test_an_idle_neuron_is_dropped_and_the_edit_still_holds(idle_neuron: None) -> None:
    patcher = _patcher(0.01)
    result = patcher.edit(PROMPT, TARGET)
    assert result.success, result.message
    assert result.losses["dropped"] == 1.0
    assert result.neurons == 4 == patcher.num_neurons
    assert not patcher.is_mistake(PROMPT, TARGET)
    keys = patcher._layer.state.keys
    assert bool((keys.norm(dim=-1) > 0).all())  # the zero-key neuron is not in the patch


def test_without_the_setting_every_trained_neuron_is_kept(idle_neuron: None) -> None:
    patcher = _patcher(0.0)
    result = patcher.edit(PROMPT, TARGET)
    assert result.success and "dropped" not in result.losses
    assert result.neurons == 5 == patcher.num_neurons


def test_neurons_the_fix_needs_are_kept_whatever_the_setting() -> None:
    """At 0.9 only the strongest neuron passes the test; the tiny model's four-token edit
    does not hold with it alone, so every neuron is kept and the edit is fixed."""
    plain, strict = _patcher(0.0), _patcher(0.9)
    results = [p.edit(PROMPT, TARGET) for p in (plain, strict)]
    assert all(r.success for r in results)
    assert results[1].neurons == results[0].neurons == 4
    assert not strict.is_mistake(PROMPT, TARGET)
    assert torch.equal(plain._layer.state.keys, strict._layer.state.keys)


def test_the_setting_is_checked_off_in_the_paper_form_and_saved(tmp_path) -> None:
    assert PatcherConfig().drop_idle_neurons == 0.0
    assert PatcherConfig.paper().drop_idle_neurons == 0.0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="drop_idle_neurons"):
            PatcherConfig(drop_idle_neurons=bad)
    fields = PatcherConfig().to_dict()
    old = {"config": {k: v for k, v in fields.items() if k != "drop_idle_neurons"}}
    assert PatcherConfig.from_manifest(old).drop_idle_neurons == 0.0
    patcher = _patcher(0.01)
    patcher.edit(PROMPT, TARGET)
    patcher.save(tmp_path / "patch")
    again = Patcher.load(make_model("llama"), make_tokenizer("llama"), tmp_path / "patch")
    assert again.config.drop_idle_neurons == 0.01
    assert torch.equal(again._layer.state.keys, patcher._layer.state.keys)
