"""Subject-swap negatives: the edit's wordings about other subjects, kept out of its neurons."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_core import edit_args, make_patcher
from test_prefix_negatives import _highest_pre_activation
from tiny import ARCHITECTURES, make_model

from tpatcher import PatcherConfig, load_model
from tpatcher.errors import InvalidEditError
from tpatcher.evaluation.data import load_task
from tpatcher.patcher import Patcher
from tpatcher.subject_negatives import (
    NAME_CONTEXT,
    known_names,
    name_vectors,
    nearest_first,
    subject_names,
    swapped_inputs,
    swapped_wordings,
)

PROMPT, TARGET, SUBJECT = "the capital of france is", "berlin", "france"
IN_VOCAB = ("germany", "italy", "spain", "japan", "china", "paris", "rome", "tokyo")


def _trained_negatives(patcher: Patcher, texts: list[str], target: str, subject: str):
    """The FFN inputs the first edit trained against (it drew its names with the seed)."""
    count, seed = patcher.config.subject_negatives, patcher.config.seed
    swapped = swapped_wordings(texts, subject, count, seed)
    assert len(swapped) == count * len(texts) and all(subject not in s for s in swapped)
    return swapped_inputs(patcher._site, lambda text: patcher.encode(text, target), swapped)


def test_each_wording_naming_the_subject_is_repeated_about_other_names() -> None:
    texts = ["The mother tongue of Ada Byron is", "Ada Byron speaks", "no subject here"]
    swapped = swapped_wordings(texts, "Ada Byron", 5, seed=3)
    assert len(swapped) == 10 and swapped == swapped_wordings(texts, "Ada Byron", 5, seed=3)
    assert all("Ada Byron" not in s for s in swapped) and "no subject here" not in swapped
    names = [s.removeprefix("The mother tongue of ").removesuffix(" is") for s in swapped[::2]]
    assert len(set(names)) == 5 and set(names) <= set(subject_names())
    assert swapped[1::2] == [f"{n} speaks" for n in names]  # the same names for each wording
    assert swapped_wordings(texts, "Ada Byron", 5, seed=4) != swapped
    assert len(swapped_wordings(texts[:1], "Ada Byron", 10_000, seed=0)) == len(subject_names())


def test_bundled_names_are_distinct_and_in_no_data_set(data_dir: Path) -> None:
    """No benchmark prompt is about a bundled name, so no neighbour is a training negative."""
    names = [n.lower() for n in subject_names()]
    assert len(names) > 100 and len(set(names)) == len(names)
    files = [data_dir / "zsre" / "zsre_mend_train_800.json", *data_dir.glob("counterfact/*.json")]
    text = " ".join(json.dumps(json.loads(f.read_text("utf-8"))).lower() for f in files)
    assert len(files) >= 2 and not [n for n in names if n in text]


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_one_padded_pass_gives_each_wordings_own_ffn_inputs(kind) -> None:
    """The swapped wordings are captured in one right-padded batch; each row must be what
    the wording alone gives, on every architecture (encoder, decoder, classifier)."""
    patcher = make_patcher(kind)
    target = edit_args(patcher)[1]
    texts = ["the capital of france is", "the capital of the big old country is", "paris is"]
    got = swapped_inputs(patcher._site, lambda t: patcher.encode(t, target), texts)
    alone = []
    for text in texts:
        example = patcher.encode(text, target)
        alone.append(patcher._site.capture(example.inputs, example.positions).q.float())
    assert torch.allclose(got, torch.cat(alone), atol=1e-4), kind
    assert swapped_inputs(patcher._site, lambda t: patcher.encode(t, target), []).shape[0] == 0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_new_neurons_stay_silent_on_the_prompt_about_other_subjects(kind, monkeypatch) -> None:
    monkeypatch.setattr("tpatcher.subject_negatives.subject_names", lambda: IN_VOCAB)
    patchers = {n: make_patcher(kind, subject_negatives=n, activation_floor=0.0) for n in (6, 0)}
    for patcher in patchers.values():
        assert patcher.edit(PROMPT, TARGET, subject=SUBJECT).success
        assert not patcher.is_mistake(PROMPT, TARGET)
    on = patchers[6]
    negatives = _trained_negatives(on, [PROMPT], TARGET, SUBJECT)
    assert negatives.shape[0] == 6 * len(on.encode(PROMPT, TARGET).positions)
    assert _highest_pre_activation(on, negatives) < 0  # silent about the others
    assert _highest_pre_activation(patchers[0], negatives) > 0  # without them: fires there
    # they train this edit only; the bank keeps the edit's own inputs, as before
    assert len(on.memory) == len(patchers[0].memory)
    assert on.edits[0].subject == SUBJECT and on.edits[0].to_manifest()["subject"] == SUBJECT


def test_a_subject_the_prompt_does_not_name_is_refused_and_nothing_changes(tmp_path) -> None:
    patcher = make_patcher("llama", subject_negatives=4)
    for subject, why in (("italy", "does not appear"), (" ", "empty")):
        with pytest.raises(InvalidEditError, match=why):
            patcher.edit(PROMPT, TARGET, subject=subject)
    assert patcher.num_neurons == 0 and not patcher.edits and patcher.edits_attempted == 0
    assert patcher.edit(PROMPT, TARGET, subject=SUBJECT).success
    patcher.save(tmp_path / "p")  # the subject is kept with the edit
    loaded = Patcher.load(make_model("llama"), patcher.tokenizer, tmp_path / "p")
    assert loaded.edits[0].subject == SUBJECT
    with pytest.raises(ValueError, match="subject_negatives"):
        PatcherConfig(subject_negatives=-1)
    assert PatcherConfig.paper().subject_negatives == 0


def test_known_names_are_the_subjects_of_the_memory_texts_and_everyday_questions() -> None:
    texts = ["Danielle Darrieux's mother tongue is French", "Here is a recipe", "My dog barks"]
    names = known_names(texts)
    assert names[0] == "Danielle Darrieux" and "Sistine Chapel" in names  # a bundled question
    assert "Here" not in names and "My" not in names
    assert len({n.lower() for n in names}) == len(names) and all(len(n) > 2 for n in names)


def test_a_known_name_holding_the_subject_or_already_in_the_texts_is_not_swapped_in() -> None:
    names = ["Ada Byron", "Lord Ada Byron II", "Babbage", "Turing", "Hopper"]
    swapped = swapped_wordings(["Ada Byron worked with Babbage"], "Ada Byron", 10, 0, names)
    assert sorted(swapped) == ["Hopper worked with Babbage", "Turing worked with Babbage"]


def test_known_names_and_earlier_subjects_are_the_second_edits_negatives(monkeypatch) -> None:
    """With ``known_subject_negatives`` the pool is the memory's names and the subjects of
    earlier edits: the second edit's neurons stay silent on its wording about the first's
    subject, where without the setting they fire."""
    monkeypatch.setattr("tpatcher.edit_negatives.known_names", lambda texts: ("germany", "spain"))
    second, target = "the capital of italy is", "tokyo"
    swapped = {"the capital of germany is", "the capital of spain is", PROMPT}
    highest = {}
    for count in (3, 0):
        patcher = make_patcher("llama", known_subject_negatives=count, activation_floor=0.0)
        assert patcher.edit(PROMPT, TARGET, subject=SUBJECT).success
        first = patcher.neurons.size
        assert patcher.edit(second, target, subject="italy").success
        assert not patcher.is_mistake(second, target) and not patcher.is_mistake(PROMPT, TARGET)
        assert patcher._negatives.known() == ["germany", "spain", "france", "italy"]
        assert set(swapped_wordings([second], "italy", 3, 1, ["germany", "spain", "france"])) == (
            swapped
        )
        encode = functools.partial(patcher.encode, target=target)
        vectors = swapped_inputs(patcher._site, encode, sorted(swapped))
        state = patcher.neurons
        pre = vectors.float() @ state.keys[first:].float().T
        if state.biases is not None:
            pre = pre + state.biases[first:].float()
        highest[count] = float(pre.max())
    assert highest[3] < 0 < highest[0], highest
    with pytest.raises(ValueError, match="known_subject_negatives"):
        PatcherConfig(known_subject_negatives=-1)
    assert PatcherConfig.paper().known_subject_negatives == 0


def test_on_smollm2_the_neighbour_keeps_its_answer() -> None:
    """The real model: an edit about one person's mother tongue, with the relation's other
    wordings about invented people as negatives; its neurons stay below beta there."""
    model, tokenizer = load_model("smollm2-135m")
    patcher = Patcher(model, tokenizer, PatcherConfig(subject_negatives=16))
    try:
        prompt, subject = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"
        neighbour = "The mother tongue of Michel Rocard is"
        before = patcher.generate(neighbour, 4)
        result = patcher.edit(prompt, "English", subject=subject)
        assert result.success and patcher.generate(prompt, 2).strip().startswith("English")
        negatives = _trained_negatives(patcher, [prompt], "English", subject)
        assert negatives.shape[0] == 16 * len(patcher.encode(prompt, "English").positions)
        assert _highest_pre_activation(patcher, negatives) < 0
        assert patcher.generate(neighbour, 4) == before, before
        assert torch.isfinite(negatives).all()
    finally:
        patcher.close()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_names_picture_is_its_last_tokens_ffn_input_whatever_the_batch(kind) -> None:
    """Names of different lengths share a right-padded pass; each row is what the name read
    alone after :data:`NAME_CONTEXT` gives at its last token."""
    patcher = make_patcher(kind)
    names = ["france", "the big old country", "rome"]
    got = name_vectors(patcher._site, patcher.tokenizer, names, batch=2)
    for name, row in zip(names, got, strict=True):
        ids = patcher.tokenizer(NAME_CONTEXT + name, return_tensors="pt")
        capture = patcher._site.capture(dict(ids), torch.tensor([ids["input_ids"].shape[1] - 1]))
        assert torch.allclose(row, capture.q[0].float(), atol=1e-4), name
    assert name_vectors(patcher._site, patcher.tokenizer, []).shape == (0, got.shape[1])


def test_nearest_names_come_first_and_are_taken_in_order() -> None:
    vectors = torch.tensor([[0.0, 1.0], [1.0, 0.1], [1.0, 0.0], [-1.0, 0.0]])
    names = ["up", "almost", "right", "left"]
    assert nearest_first(torch.tensor([2.0, 0.0]), names, vectors) == [
        "right",
        "almost",
        "up",
        "left",
    ]
    texts = ["Ada Byron worked"]
    got = swapped_wordings(
        texts, "Ada Byron", 2, 0, ["Lord Ada Byron", "Turing", "Hopper", "X"], in_order=True
    )
    assert got == ["Turing worked", "Hopper worked"]


def test_nearest_pick_trains_the_edit_against_the_names_nearest_its_subject(monkeypatch) -> None:
    """With ``known_subject_pick="nearest"`` the known names are ordered by their pictures'
    cosine to the subject's, and the edit's negatives are the first of them."""
    monkeypatch.setattr("tpatcher.edit_negatives.known_names", lambda texts: IN_VOCAB)
    patcher = make_patcher(
        "llama", known_subject_negatives=2, known_subject_pick="nearest", activation_floor=0.0
    )
    site, tokenizer = patcher._site, patcher.tokenizer
    ordered = patcher._negatives.known(SUBJECT)
    pictures = name_vectors(site, tokenizer, [SUBJECT, *IN_VOCAB])
    cosine = torch.nn.functional.cosine_similarity(pictures[1:], pictures[:1])
    assert ordered == [IN_VOCAB[i] for i in cosine.argsort(descending=True).tolist()]
    assert patcher._negatives.known() == list(IN_VOCAB)  # no subject: no order
    assert patcher.edit(PROMPT, TARGET, subject=SUBJECT).success
    first_two = [PROMPT.replace(SUBJECT, name) for name in ordered[:2]]
    encode = functools.partial(patcher.encode, target=TARGET)
    assert _highest_pre_activation(patcher, swapped_inputs(site, encode, first_two)) < 0
    with pytest.raises(ValueError, match="known_subject_pick"):
        PatcherConfig(known_subject_pick="closest")
    assert PatcherConfig.paper().known_subject_pick == "random"


def test_on_smollm2_a_names_nearest_known_names_are_of_its_kind() -> None:
    """The real model's pictures: a city's nearest names are cities, a person's people, a
    company's companies, so the nearest pick swaps in the neighbours a key could fire on.
    (Not always all three: Michel Rocard, a French politician, has Paris above Mandela.)"""
    model, tokenizer = load_model("smollm2-135m")
    patcher = Patcher(model, tokenizer, PatcherConfig())
    try:
        kinds = {
            "city": ["Cairo", "Paris", "Nairobi"],
            "person": ["Angela Merkel", "Nelson Mandela", "Albert Einstein"],
            "company": ["Microsoft", "Netflix", "Amazon"],
        }
        subjects = {
            "Bratislava": "city",
            "Lyon": "city",
            "Helsinki": "city",
            "Michel Rocard": "person",
            "Danielle Darrieux": "person",
            "Barack Obama": "person",
            "Toyota": "company",
            "Siemens": "company",
            "Nokia": "company",
        }
        pool = [name for names in kinds.values() for name in names]
        pictures = name_vectors(patcher._site, tokenizer, [*subjects, *pool])
        all_three = 0
        for row, (subject, kind) in enumerate(subjects.items()):
            nearest = nearest_first(pictures[row], pool, pictures[len(subjects) :])
            assert nearest[0] in kinds[kind], (subject, nearest)
            all_three += set(nearest[:3]) == set(kinds[kind])
        assert all_three >= 8, all_three
    finally:
        patcher.close()


def test_in_memory_a_later_edit_stays_silent_on_an_earlier_edits_swapped_wordings(
    monkeypatch, tmp_path
) -> None:
    """With ``subject_negatives_in_memory`` the first edit's wordings about other subjects
    join the bank: a later edit of the same wording, made without a subject (so with no
    negatives of its own), stays silent on them, where without the setting it fires. They are
    saved and loaded with the edit and leave with its rollback."""
    names = ("germany", "spain", "japan", "china")
    monkeypatch.setattr("tpatcher.subject_negatives.subject_names", lambda: names)
    second, target = "the capital of italy is", "tokyo"
    highest, patchers, grown = {}, {}, {}
    for shared in (True, False):
        patcher = make_patcher(
            "llama", subject_negatives=4, subject_negatives_in_memory=shared, activation_floor=0.0
        )
        bank = len(patcher.memory)
        assert patcher.edit(PROMPT, TARGET, subject=SUBJECT).success
        swaps = _trained_negatives(patcher, [PROMPT], TARGET, SUBJECT)
        grown[shared] = len(patcher.memory) - bank
        first = patcher.neurons.size
        assert patcher.edit(second, target).success  # no subject: no negatives of its own
        assert not patcher.is_mistake(second, target) and not patcher.is_mistake(PROMPT, TARGET)
        state = patcher.neurons
        pre = swaps.float() @ state.keys[first:].float().T
        highest[shared] = float(pre.max())
        patchers[shared] = patcher
    assert highest[True] < 0 < highest[False], highest
    assert (
        grown[True] - grown[False]
        == len(swaps)
        == 4 * len(patcher.encode(PROMPT, TARGET).positions)
    )
    on = patchers[True]
    assert torch.equal(on.edits[0].memory[grown[False] :], swaps)
    on.save(tmp_path / "p")
    loaded = Patcher.load(make_model("llama"), on.tokenizer, tmp_path / "p")
    assert loaded.config.subject_negatives_in_memory
    assert sorted(on.edits[0].swapped) == sorted(names)  # the names behind the kept rows
    assert loaded.edits[0].swapped == on.edits[0].swapped and not patchers[False].edits[0].swapped
    assert all(torch.equal(a.memory, b.memory) for a, b in zip(loaded.edits, on.edits, strict=True))
    before = len(on.memory)
    on.rollback(on.edits[0].edit_id)
    assert before - len(on.memory) == grown[True]
    assert not PatcherConfig.paper().subject_negatives_in_memory


def test_in_memory_a_later_edit_about_a_swapped_in_name_is_not_trained_against_it(
    monkeypatch,
) -> None:
    """The first edit's wording about Germany joined the bank; a later edit about Germany
    (another wording of the same relation) trains without those rows, so its neurons are not
    held below beta on that wording, its own paraphrase, as they are trained against them."""
    names = ("germany", "spain", "japan", "china")
    monkeypatch.setattr("tpatcher.subject_negatives.subject_names", lambda: names)
    later, target, paraphrase = (
        "the capital city of germany is",
        "tokyo",
        "the capital of germany is",
    )
    highest = {}
    for guarded in (True, False):
        patcher = make_patcher(
            "llama", subject_negatives=4, subject_negatives_in_memory=True, activation_floor=0.0
        )
        assert patcher.edit(PROMPT, TARGET, subject=SUBJECT).success
        about = patcher._negatives.earlier_swaps_about("germany", patcher.encode)
        encode = functools.partial(patcher.encode, target=TARGET)
        assert torch.equal(about, swapped_inputs(patcher._site, encode, [paraphrase]))
        stored = patcher.edits[0].memory
        assert torch.cdist(about, stored).min(dim=1).values.max() < 1e-4  # they are in the bank
        assert not len(patcher._negatives.earlier_swaps_about("italy", patcher.encode))
        rows = patcher._edit_negatives(patcher.encode(later, target), [later], target, "germany")
        bank = patcher.memory.vectors()
        trained = rows.with_bank(bank)
        assert len(trained) == len(bank) - len(about) + len(rows.subject)
        assert torch.cdist(about, trained).min(dim=1).values.min() > 1e-3
        if not guarded:
            monkeypatch.setattr(
                "tpatcher.edit_negatives.EditNegatives.earlier_swaps_about",
                lambda self, subject, encode: torch.zeros(0, self.site.hidden_size),
            )
        first = patcher.neurons.size
        assert patcher.edit(later, target, subject="germany").success
        paraphrase_q = swapped_inputs(
            patcher._site, functools.partial(patcher.encode, target=target), [paraphrase]
        )[:1]  # where the answer's first token is due
        highest[guarded] = float((paraphrase_q @ patcher.neurons.keys[first:].float().T).max())
    # trained against the rows the paraphrase is held at beta; left out, it is not
    assert highest[False] < patcher.beta + 0.1 and highest[True] > highest[False] + 1, highest


def test_swap_pool_lists_the_subjects_known_when_their_item_is_reached(data_dir: Path) -> None:
    """``benchmarks/swap_pool.py``: the stream subjects that are memory names or earlier
    subjects when reached, the most the rule above can touch in a run."""
    root = Path(__file__).resolve().parents[1]
    script = [sys.executable, str(root / "benchmarks" / "swap_pool.py"), "--data", str(data_dir)]
    args = ["--task", "counterfact", "--edits", "40", "--heldout", "4", "--memory-records", "30"]
    done = subprocess.run([*script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    loaded = load_task("counterfact", data_dir, 40, heldout=4, memory_records=30)
    pool = {n.lower() for n in known_names(loaded.memory_texts)}
    subjects = [(item.subject or "").lower() for item in loaded.stream]
    assert result["items"] == 40 and result["in_pool"] == len(result["subjects"])
    expected = [s for i, s in enumerate(subjects) if s and (s in pool or s in subjects[:i])]
    assert [name.lower() for name in result["subjects"]] == expected
