"""The settings of one Patcher, with the paper's defaults (departures: ``neuron_activation``,
``max_neurons_per_edit``, ``memory_chat_format``, ``memory_chat_answers``, ``memory_questions``,
``edit_headroom``, ``activation_floor``; :meth:`PatcherConfig.paper` undoes them all).

Every knob of Transformer-Patcher (Huang et al., ICLR 2023) lives here so that a run can be
reproduced from the JSON manifest that :meth:`tpatcher.Patcher.save` writes.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from transformers.activations import ACT2FN

#: Memory threshold beta per FFN activation, chosen so that phi(beta) is negligible.
#: GELU(-3) = -0.004 (the paper's value); SiLU decays much more slowly (SiLU(-3) = -0.14),
#: so a SiLU neuron must be pushed to -8 (SiLU(-8) = -0.003) to be equally silent.
#: ReLU is exactly zero below 0; -3 keeps the paper's safety margin.
MEMORY_THRESHOLD_BY_ACTIVATION: dict[str, float] = {
    "gelu": -3.0,
    "gelu_new": -3.0,
    "gelu_fast": -3.0,
    "gelu_pytorch_tanh": -3.0,
    "gelu_python": -3.0,
    "quick_gelu": -3.0,
    "relu": -3.0,
    "silu": -8.0,
    "swish": -8.0,
}

#: The default ``activation_floor`` per neuron activation, for generation (3 elsewhere; 0,
#: the paper's, for classification). SiLU neurons' ``beta`` of -8 would leave a band of 11
#: between memory and edit, which a small Llama's edit failed to cross; not measured at scale.
DEFAULT_FLOOR_BY_ACTIVATION: dict[str, float] = {"silu": 0.0, "swish": 0.0}

#: What ``neuron_activation="auto"`` gives new neurons on an FFN with this activation, where it
#: differs from the FFN's own. SiLU's negative tail (SiLU(-2) = -0.24) leaks a patch into
#: every token that the memory bank does not cover; over hundreds of edits that decays
#: locality and perplexity (BENCHMARKS.md, "ReLU neurons"). ReLU neurons are exactly silent
#: there. GELU's tail is far thinner and the paper's models use it, so GELU FFNs keep it,
#: unless the FFN's output is normalised before it joins the residual (Gemma's post-FFN
#: norm): there the patch competes with the FFN's own small output, and GELU's tail raised
#: Gemma-3-270M's perplexity by 19% in 29 edits, against 5% with ReLU (BENCHMARKS.md).
AUTO_NEURON_ACTIVATION: dict[str, str] = {"silu": "relu", "swish": "relu"}


def neuron_activation_from_word(word: str) -> str | None:
    """``neuron_activation`` from a command-line word, where ``"ffn"`` stands for ``None``
    (the FFN's own activation: the paper's form)."""
    return None if word == "ffn" else word


def json_object(text: str, option: str) -> dict[str, Any]:
    """A JSON object given as a command-line ``option``; a ``ValueError`` that names the
    option when the text is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{option} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, e.g. '{{\"max_steps\": 500}}'")
    return value


def patcher_overrides(text: str, option: str = "--patcher") -> dict[str, Any]:
    """``PatcherConfig`` fields from the command line: a JSON object, or ``paper`` for the
    paper's form (:data:`PAPER_FORM`)."""
    return dict(PAPER_FORM) if text.strip() == "paper" else json_object(text, option)


def settings_for(
    manifest: dict[str, Any] | None, overrides: dict[str, Any], where: str, hint: str
) -> PatcherConfig:
    """What a patch directory's new edits train with: for a new one (``manifest`` None), the
    defaults with ``overrides``; a saved one keeps the settings it was made with, and an
    override that differs from them is a ``ValueError`` naming the field, ``where`` it was
    saved and the ``hint``, since its saved edits were trained with its own settings. A bad
    or unknown field is refused either way."""
    try:
        wanted = PatcherConfig.from_dict(overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid settings: {exc}") from exc
    if manifest is None:
        return wanted
    config = PatcherConfig.from_manifest(manifest)
    stored = config.to_dict()
    for name, value in overrides.items():
        if stored[name] != value:
            raise ValueError(
                f"{where} was made with {name}={stored[name]!r}, not {value!r}; its saved "
                f"edits were trained with its own settings ({hint})"
            )
    return config


#: The fields where tpatcher's defaults depart from the paper, at the paper's values.
PAPER_FORM: dict[str, Any] = {
    "neuron_activation": None,
    "max_neurons_per_edit": 5,
    "memory_chat_format": False,
    "memory_chat_answers": 0,
    "memory_questions": False,
    "edit_headroom": 1.0,
    "activation_floor": 0.0,
    "prefix_negatives": 0,
    "subject_negatives": 0,
    "known_subject_negatives": 0,
    "subject_negatives_in_memory": False,
    "close_target_word": False,
}

#: What a manifest saved before each of these fields existed meant by its absence.
_BEFORE_THE_FIELD: dict[str, Any] = {
    "edit_headroom": 1.0,
    "memory_chat_answers": 0,
    "activation_floor": 0.0,
    "floor_first_position_only": False,
    "memory_questions": False,
    "subject_negatives": 0,
    "known_subject_negatives": 0,
    "known_subject_pick": "random",
    "subject_negatives_in_memory": False,
    "close_target_word": False,
    "mine_default_bank": False,
    "drop_idle_neurons": 0.0,
    "memory_question_prompt": None,
    "distinct_memory": False,
}


@dataclass
class PatcherConfig:
    """How patches are placed and trained.

    Attributes:
        max_neurons_per_edit: Generation edits get one neuron per target position the model
            gets wrong (teacher-forced), the first ``max_neurons_per_edit`` of them.
            Classification edits always get one neuron, at the position the head reads. The
            reference implementation caps this at 5; with ReLU neurons a target position
            without a neuron of its own rarely gets fixed (a silent neuron has no gradient
            there), so long names and dates (6-12 tokens on SmolLM2's tokenizer) failed, and
            the default is 16.
        lr: Adam learning rate for the new neurons.
        weight_decay: Adam weight decay (L2, as in the reference implementation).
        grad_clip: Gradient-norm clip applied to the new neurons each step.
        max_steps: Step budget for one edit. An edit not fixed by then fails and leaves no
            neurons behind.
        plateau_patience: Steps without improvement of the total loss before the learning
            rate is halved (``ReduceLROnPlateau``).
        plateau_factor: Factor applied to the learning rate on a plateau.
        early_stop: Stop as soon as the edit is fixed and the memory loss stops improving
            (or every memory constraint holds). ``False`` always runs ``max_steps`` steps,
            which makes runs comparable step for step (the cached and full loops, timing).
        memory_patience: Once the edit is fixed, stop after this many steps without the
            memory loss improving by more than ``memory_tolerance`` (relative).
        memory_tolerance: Relative improvement of the memory loss that counts as progress.
        activation_weight: ``a`` in ``L = L_edit + a L_act + m L_mem``.
        memory_weight: ``m``; ``None`` means the paper's value, 5 for classification and
            10 for generation.
        memory_threshold: ``beta``: memory pre-activations are pushed below it. ``None``
            picks it from the FFN's activation (:data:`MEMORY_THRESHOLD_BY_ACTIVATION`).
        margin: ``gamma``: the edit's pre-activation must beat every memory pre-activation
            by this much.
        activation_top_k: ``L_act`` averages the top-k of ``exp(f - s)`` over the new neurons.
        activation_floor: ``f``: ``L_act`` pushes each new neuron's pre-activation on its
            edit above this value, and training stops early only once every neuron is there
            (or the memory loss stops improving). ``0`` is the paper's; ``None`` means 3
            for generation with ReLU or GELU neurons, else 0. Memory inputs stay
            below ``beta`` whatever it is, so a higher floor moves a neuron's firing point
            (zero) away from its edit towards the memory inputs: other wordings of the edit,
            which lie in between, start to fire, and so may unseen inputs as close to the
            edit (BENCHMARKS.md, "Why paraphrases fail").
        floor_first_position_only: Apply ``activation_floor`` only to the neurons placed where
            a wording's first target token is due (where a paraphrase's answer is decided);
            neurons of later target tokens key on positions such as "... in 19" that recur
            inside free answers, and keep the paper's floor of 0. ``False`` floors every
            neuron.
        memory_top_k: ``L_mem`` averages the top-k memory terms of each new neuron.
        value_amplifier_init: Initial value of the trainable per-dimension amplifier that
            scales each new neuron's random value vector.
        edit_headroom: The new neurons are trained at this fraction of their strength and
            committed at full strength, so the fix holds with room to spare: also where they
            fire up to ``1 / edit_headroom`` times more weakly than on the edit, as on a
            paraphrase. ``1.0`` is the paper's (just enough to fix the edit); lower values
            generalise further and leak more (BENCHMARKS.md, "Headroom and answers").
        vocab_candidates: Between full refreshes (every 10 steps) the edit loss normalises
            over each supervised position's top ``vocab_candidates`` tokens plus the targets,
            instead of the whole vocabulary; whether the edit is fixed is always decided on
            the whole vocabulary. ``0`` uses the whole vocabulary at every step (exact, slower
            on large vocabularies).
        neuron_activation: Activation of the new neurons. ``"auto"`` (default) uses the
            FFN's own, except on SiLU FFNs (Llama, Qwen, SmolLM2) and FFNs with a post-FFN
            norm (Gemma), whose neurons get ReLU (:data:`AUTO_NEURON_ACTIVATION`). ``None``
            always uses the FFN's own (the paper's form, and what
            :meth:`~tpatcher.Patcher.merge` needs). ``"relu"`` makes a neuron
            exactly silent wherever its pre-activation is below zero, whereas SiLU and GELU
            neurons still emit their small negative tails on text the memory bank does not
            cover; :meth:`~tpatcher.Patcher.merge` folds a ReLU patch into a SiLU or GELU FFN
            through a scaled gate (within 1e-3 of the patched logits). Any other name in
            ``transformers.activations.ACT2FN`` is accepted too.
        memory_size: Most FFN-input vectors kept in the default memory bank.
        include_default_memory: With memory texts of your own, also keep the default bank
            (tpatcher's generic prompts and the unedited model's continuations of them), so
            new neurons stay silent on general text as well as on your domain's text.
        memory_chat_format: Also put the memory texts (or the default bank's prompts) through
            the model's chat template as user turns, and keep those FFN inputs too (at most a
            quarter of ``memory_size``). An edit made through the chat template places its
            first neuron at the opening of the answer, whose FFN input every chat turn shares
            in part; without chat-formatted memory such a neuron also fires on unrelated chat
            questions. ``None``: when the tokenizer has a chat template. ``False`` is the
            paper's memory.
        memory_chat_answers: With chat-formatted memory, let the unedited model answer each
            memory turn (greedy, at most this many tokens) and keep the FFN inputs of the turn
            and its answer too (at most another quarter of ``memory_size``). A neuron for a
            target's second or later token keys on a position such as "... in 19" that recurs
            inside free answers; without answer positions in memory it can fire there and
            change an unrelated chat answer. ``0``: turns without answers. The answers are
            generated once per model and memory texts and cached with the default bank.
        memory_questions: With chat-formatted memory, also put tpatcher's bundled everyday
            questions (about 260 questions on people, places, films, dates and science,
            unlike any benchmark set) into memory as chat turns, with the unedited model's
            answers. An edit's first neuron sits at the opening of an answer; memory texts
            from one domain leave the openings of other questions users ask uncovered, and
            such a neuron then answers them with the edit's target. Every turn's opening
            (its last token) is kept in the bank whatever the size caps drop.
        memory_question_prompt: A prompt with ``{question}``, such as ``"Question:
            {question}\nAnswer:"``: tpatcher's everyday questions also go into memory in
            it, with the unedited model's answers (``memory_chat_answers`` tokens), every
            prompt's last token kept. ``memory_questions`` covers edits made through the chat
            template; this covers edits made in a prompt of your own, and models without a
            chat template. ``None`` (default): not.
        distinct_memory: Keep each repeated memory vector once: in the bank (before its
            size caps), in the mining pool and across the edits' saved memories. Texts that
            open alike give one FFN input at every shared position (a chat template's system
            turn, ``"Question:"``), so without it hundreds of copies of one vector weigh in
            ``L_mem``'s top-k mean and a mining round's cap. ``False`` (default, the paper)
            keeps them all.
        hard_negative_rounds: Hard-negative mining: after training, probe the new neurons on the
            mining pool (the memory texts' FFN inputs the size caps left out); inputs where a
            neuron exceeds beta, or comes within the margin of its edit, join the memory (and
            the edit's saved memory) and training goes on, at most this many rounds. ``0``
            (default, the paper) mines nothing.
        negative_pool_size: Most FFN inputs kept in the mining pool.
        mine_default_bank: With texts of your own, mine the default bank too: only its inputs
            a new neuron fires on join memory (``include_default_memory``: all of them).
        prefix_negatives: Contexts cut from the memory texts in which each edit's partial
            answer (every target token but the last) is placed; the FFN inputs there are
            negatives for this edit's training, so a neuron of a target's later token does
            not fire after the same prefix in unrelated text (:mod:`tpatcher.prefix_negatives`).
            ``0`` (the paper's) is off; causal LMs only.
        subject_negatives: For an edit given its ``subject`` (``Patcher.edit(subject=...)``),
            this many copies of each wording that names it, with the subject replaced by an
            invented name; the FFN inputs at the edit's positions there are negatives for
            this edit's training, so its neurons key on the subject, not on the relation
            alone, and leave the same question about other subjects as it was
            (:mod:`tpatcher.subject_negatives`). ``0`` (the paper's) is off; an edit without
            a subject gets none.
        known_subject_negatives: As ``subject_negatives``, with names the model knows in
            place of invented ones: the subjects guessed in the memory texts and the bundled
            everyday questions, and the earlier edits' subjects (a model pictures a name it
            knows unlike an unknown one, and real neighbours are names it knows). Adds to
            ``subject_negatives``; ``0`` (the paper's) is off.
        known_subject_pick: Which known names: ``"random"`` (a seeded draw) or
            ``"nearest"``, those whose picture in the model (the last FFN's input at the
            name) is nearest the subject's, so a city's edit is trained against other cities,
            the neighbours its key is likeliest to fire on (causal LMs; others draw).
        subject_negatives_in_memory: Keep an edit's subject-swap negatives in the bank
            (and its saved patch), so later edits, in whatever wording, are trained silent
            on them too; an edit about a name swapped in earlier trains without those
            wordings, maybe its paraphrases. ``False`` (the paper's): their own edit only.
        close_target_word: Where the model, given the whole target, would go on inside its
            last word ("Titan" -> "Titania"), also train the next token to be the likeliest
            one that ends the word (:mod:`tpatcher.word_end`). ``False`` (the paper's) trains
            the target's tokens only; causal LMs only.
        drop_idle_neurons: After training, drop the edit's neurons whose largest output on
            its own target positions is under this fraction of its strongest neuron's, if
            the fix holds without them: a later target token's neuron that training left all
            but silent on its edit adds nothing there and can still fire on other questions.
            ``0`` (the paper's) keeps every neuron.
        add_edits_to_memory: After each edit, its own FFN inputs join the memory bank so
            later neurons stay silent on earlier edits.
        training_loop: ``"cached"`` optimises on a one-off capture of the last FFN's inputs
            and of what follows it (fast); ``"full"`` runs the whole model every step (the
            reference implementation's way, kept for comparison).
        seed: Seeds the random value vectors of new neurons (edit ``i`` uses ``seed + i``).
        target_module: Override the automatic choice of the last FFN: the dotted name of the
            FFN module (for example ``"model.layers.29.mlp"``) in a supported architecture.
        add_space_before_target: Insert a space between prompt and target when neither has
            one, so ``edit("The capital of France is", "Paris")`` trains on `` Paris``.
    """

    max_neurons_per_edit: int = 16
    lr: float = 1e-2
    weight_decay: float = 0.01
    grad_clip: float = 5.0
    max_steps: int = 2000
    plateau_patience: int = 10
    plateau_factor: float = 0.5
    early_stop: bool = True
    memory_patience: int = 10
    memory_tolerance: float = 1e-3
    activation_weight: float = 1.0
    memory_weight: float | None = None
    memory_threshold: float | None = None
    margin: float = 3.0
    activation_top_k: int = 5
    activation_floor: float | None = None
    floor_first_position_only: bool = True
    memory_top_k: int = 1000
    value_amplifier_init: float = 10.0
    edit_headroom: float = 0.5
    vocab_candidates: int = 1024
    neuron_activation: str | None = "auto"
    memory_size: int = 20000
    include_default_memory: bool = False
    memory_chat_format: bool | None = None
    memory_chat_answers: int = 48
    memory_questions: bool = True
    memory_question_prompt: str | None = None
    distinct_memory: bool = False
    hard_negative_rounds: int = 0
    negative_pool_size: int = 200000
    mine_default_bank: bool = False
    prefix_negatives: int = 0
    subject_negatives: int = 0
    known_subject_negatives: int = 0
    known_subject_pick: Literal["random", "nearest"] = "random"
    subject_negatives_in_memory: bool = False
    close_target_word: bool = False
    drop_idle_neurons: float = 0.0
    add_edits_to_memory: bool = True
    training_loop: Literal["cached", "full"] = "cached"
    seed: int = 0
    target_module: str | None = None
    add_space_before_target: bool = True

    def __post_init__(self) -> None:
        _check(self)

    def resolved_memory_weight(self, task: str) -> float:
        """``m`` for this task: the paper uses 5 for classification, 10 for generation."""
        if self.memory_weight is not None:
            return self.memory_weight
        return 5.0 if task == "seq-cls" else 10.0

    def resolved_activation_floor(self, task: str, activation: str) -> float:
        """``f`` for this task and neuron activation: 3 for generation with ReLU or GELU
        neurons (BENCHMARKS.md, "Why paraphrases fail"), else the paper's 0
        (:data:`DEFAULT_FLOOR_BY_ACTIVATION`)."""
        if self.activation_floor is not None:
            return self.activation_floor
        return 0.0 if task == "seq-cls" else DEFAULT_FLOOR_BY_ACTIVATION.get(activation, 3.0)

    def resolved_neuron_activation(self, ffn_activation: str, normed_output: bool = False) -> str:
        """The new neurons' activation on an FFN that uses ``ffn_activation`` (and whose
        output passes a norm of its own before the residual, ``normed_output``)."""
        if self.neuron_activation is None:
            return ffn_activation
        if self.neuron_activation == "auto":
            default = "relu" if normed_output else ffn_activation
            return AUTO_NEURON_ACTIVATION.get(ffn_activation, default)
        return self.neuron_activation

    def resolved_memory_threshold(self, activation: str) -> float:
        """``beta`` for this activation (see :data:`MEMORY_THRESHOLD_BY_ACTIVATION`)."""
        if self.memory_threshold is not None:
            return self.memory_threshold
        return MEMORY_THRESHOLD_BY_ACTIVATION.get(activation, -3.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def key_fields(self) -> dict[str, Any]:
        """The settings that tell runs apart: every field but those at the value their
        absence meant (:data:`_BEFORE_THE_FIELD`), so a new setting, left off, does not make
        a resumable benchmark run start over."""
        return {
            name: value
            for name, value in self.to_dict().items()
            if not (name in _BEFORE_THE_FIELD and value == _BEFORE_THE_FIELD[name])
        }

    @classmethod
    def paper(cls, **overrides: Any) -> PatcherConfig:
        """The paper's form: every departure listed in this module's docstring undone."""
        return cls(**{**PAPER_FORM, **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatcherConfig:
        """The config with ``data``'s fields; an unknown field is refused, never dropped (a
        misspelt override would otherwise run the defaults)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hints = [
                f"{k!r}" + (f" (did you mean {c[0]!r}?)" if c else "") for k, c in close.items()
            ]
            raise ValueError(f"PatcherConfig has no field {', '.join(hints)}")
        return cls(**data)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> PatcherConfig:
        """The settings a saved patch was made with.

        Patches saved before ``neuron_activation`` existed have no such field; their neurons
        use the FFN's own activation, so that is what they load with (not today's default).
        Likewise later fields take the value that matched their absence
        (:data:`_BEFORE_THE_FIELD`), so further edits are made as the saved ones were.
        ``"auto"`` becomes the activation it gave when the patch was saved, so a change of
        what ``"auto"`` means never strands a saved patch.
        """
        data = dict(manifest.get("config") or {})
        data.setdefault("neuron_activation", None)
        for name, before in _BEFORE_THE_FIELD.items():
            data.setdefault(name, before)
        if data["neuron_activation"] == "auto" and manifest.get("activation"):
            data["neuron_activation"] = manifest["activation"]  # what "auto" gave then
        return cls.from_dict(data)


def _check(config: PatcherConfig) -> None:
    """Refuse a setting out of range, naming the field."""
    positive_ints = ("max_neurons_per_edit", "max_steps", "activation_top_k", "memory_top_k")
    for name in positive_ints:
        if int(getattr(config, name)) < 1:
            raise ValueError(f"PatcherConfig.{name} must be >= 1, got {getattr(config, name)}")
    counts = ("hard_negative_rounds", "negative_pool_size", "memory_chat_answers")
    for name in (*counts, "prefix_negatives", "subject_negatives", "known_subject_negatives"):
        if int(getattr(config, name)) < 0:
            raise ValueError(f"PatcherConfig.{name} must be >= 0, got {getattr(config, name)}")
    if not 0 < config.edit_headroom <= 1:
        raise ValueError(
            f"PatcherConfig.edit_headroom must be in (0, 1], got {config.edit_headroom}"
        )
    if config.activation_floor is not None and not 0 <= config.activation_floor < 1e3:
        raise ValueError(
            f"PatcherConfig.activation_floor must be >= 0 (and finite), "
            f"got {config.activation_floor}"
        )
    if config.lr <= 0:
        raise ValueError(f"PatcherConfig.lr must be > 0, got {config.lr}")
    if not 0 <= config.drop_idle_neurons < 1:
        raise ValueError(
            f"PatcherConfig.drop_idle_neurons must be in [0, 1), got {config.drop_idle_neurons}"
        )
    if config.neuron_activation not in (None, "auto") and config.neuron_activation not in ACT2FN:
        raise ValueError(
            f"PatcherConfig.neuron_activation {config.neuron_activation!r} is not 'auto', "
            "None or an activation transformers knows (for example 'relu', 'gelu')"
        )
    prompt = config.memory_question_prompt
    if prompt is not None and ("{question}" not in prompt or _formatted(prompt) is None):
        raise ValueError(
            "PatcherConfig.memory_question_prompt must be a prompt holding {question} and no "
            f"other {{field}}, got {prompt!r}"
        )
    if config.known_subject_pick not in ("random", "nearest"):
        raise ValueError(
            "PatcherConfig.known_subject_pick must be 'random' or 'nearest', "
            f"got {config.known_subject_pick!r}"
        )
    if config.training_loop not in ("cached", "full"):
        raise ValueError(
            f"PatcherConfig.training_loop must be 'cached' or 'full', got {config.training_loop!r}"
        )


def _formatted(prompt: str) -> str | None:
    """``prompt`` with a question in it, or ``None`` where it names other fields."""
    try:
        return prompt.format(question="q")
    except (KeyError, IndexError, ValueError):
        return None
