"""The ``tpatcher`` command on the real default model."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tpatcher.cli import app

runner = CliRunner()


def test_demo_patches_real_mistakes(tmp_path) -> None:
    args = ["demo", "--limit", "3", "--lead", "--save-to", str(tmp_path / "p")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mistakes patched" in result.output
    assert "unrelated answers unchanged" in result.output
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert 1 <= len(manifest["edits"]) <= 3
    for edit in manifest["edits"]:  # --lead: the bare question (and a lead) trained too
        assert edit["also"][0] in edit["prompt"] and 1 <= len(edit["also"]) <= 2


def test_demo_in_the_template_keeps_everyday_questions_in_that_template() -> None:
    """Asked in the plain template, the demo's memory holds the everyday questions in it; asked
    through the chat template ('auto' on a chat model), chat memory covers them instead."""
    from tpatcher.cli import _demo_patcher

    patcher, form = _demo_patcher("smollm2-135m", "template", "auto")
    try:
        assert form == "template"
        assert patcher.config.memory_question_prompt == "Question: {question}\nAnswer:"
    finally:
        patcher.close()
    patcher, form = _demo_patcher("smollm2-135m", "auto", "auto")
    try:
        assert form == "chat" and patcher.config.memory_question_prompt is None
    finally:
        patcher.close()


def test_edit_generate_info_round_trip(tmp_path) -> None:
    patch = tmp_path / "patch"
    prompt = "Question: What is the capital of Nigeria?\nAnswer:"
    args = ["edit", str(patch), "--prompt", prompt, "--target", "Abuja", "--guess-subject"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "added" in result.output and "subject: 'Nigeria'" in result.output
    assert json.loads((patch / "manifest.json").read_text())["edits"][0]["subject"] == "Nigeria"
    args = ["generate", prompt, "--patch-dir", str(patch), "--max-new-tokens", "3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "Abuja" in result.output, result.output
    result = runner.invoke(app, ["info", str(patch)])
    assert result.exit_code == 0 and "1 edit(s)" in result.output and "Abuja" in result.output
    assert "neurons relu" in result.output  # SmolLM2's FFN is SiLU: ReLU neurons by default


def test_chat_edit_trains_and_records_other_wordings(tmp_path) -> None:
    """``edit --chat --lead --also``: the given wording, the bare question (and the model's
    answer lead) are trained with the chat turn and recorded with the edit, and each form
    is answered with the target; ``--lead`` without ``--chat`` and a blank ``--also`` are
    refused before the model loads."""
    patch = tmp_path / "patch"
    question = "What is the capital of Nigeria?"
    template = f"Question: {question}\nAnswer:"
    args = ["edit", str(patch), "--prompt", question, "--target", "Lagos"]
    result = runner.invoke(app, [*args, "--lead"])
    assert result.exit_code == 2 and "--lead needs --chat" in result.output, result.output
    result = runner.invoke(app, [*args, "--chat", "--also", " "])
    assert result.exit_code == 2 and "--also wording is blank" in result.output
    assert not patch.exists()
    result = runner.invoke(app, [*args, "--chat", "--lead", "--also", template])
    assert result.exit_code == 0 and "added" in result.output, result.output
    also = json.loads((patch / "manifest.json").read_text())["edits"][0]["also"]
    assert also[:2] == [template, question] and len(also) <= 3, also
    for prompt, chat in ((question, ["--chat"]), (template, []), (question, [])):
        ask = ["generate", prompt, *chat, "--patch-dir", str(patch), "--max-new-tokens", "4"]
        result = runner.invoke(app, ask)
        assert result.exit_code == 0 and "Lagos" in result.output, (prompt, result.output)


def test_cli_errors_are_clear_and_change_nothing(tmp_path) -> None:
    patch = tmp_path / "patch"
    result = runner.invoke(app, ["edit", str(patch), "--prompt", "", "--target", "x"])
    assert result.exit_code == 2 and "prompt is empty" in result.output
    assert not patch.exists()
    result = runner.invoke(app, ["info", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "not a patch directory" in result.output
    patch.mkdir()
    (patch / "manifest.json").write_text("{broken")
    result = runner.invoke(app, ["edit", str(patch), "--prompt", "Hi", "--target", "there"])
    assert result.exit_code == 2 and "damaged" in result.output
    assert (patch / "manifest.json").read_text() == "{broken"
    args = ["edit", str(tmp_path / "new"), "--prompt", "Hi", "--target", "there"]
    result = runner.invoke(app, [*args, "--neuron-activation", "sparkle"])
    assert result.exit_code == 2 and "neuron_activation 'sparkle'" in result.output
    assert not (tmp_path / "new").exists()
    result = runner.invoke(app, ["generate", "hello", "--model", "no-such-model"])
    assert result.exit_code == 2 and "smollm2-135m" in result.output


def test_chat_edit_with_settings_and_a_saved_patch_keeps_its_own(tmp_path) -> None:
    """``edit --chat --patcher``: the question is edited as a chat turn with the settings
    given, ``generate --chat`` answers it, and the saved patch refuses other settings,
    naming the field, before the model loads, leaving the patch as it was."""
    patch = tmp_path / "patch"
    question = "What is the capital of Nigeria?"
    args = ["edit", str(patch), "--prompt", question, "--target", "Lagos", "--chat"]
    result = runner.invoke(app, [*args, "--patcher", '{"max_steps": 300}'])
    assert result.exit_code == 0 and "added" in result.output, result.output
    manifest = json.loads((patch / "manifest.json").read_text())
    assert manifest["config"]["max_steps"] == 300
    edited = manifest["edits"][0]["prompt"]
    assert edited.startswith("<|im_start|>") and question in edited and edited != question
    args_generate = ["generate", question, "--chat", "--patch-dir", str(patch)]
    result = runner.invoke(app, [*args_generate, "--max-new-tokens", "4"])
    assert result.exit_code == 0 and "Lagos" in result.output, result.output
    before = (patch / "manifest.json").read_bytes()
    other = ["edit", str(patch), "--prompt", "Who wrote Hamlet?", "--target", "Marlowe"]
    result = runner.invoke(app, [*other, "--patcher", '{"max_steps": 200}'])
    assert result.exit_code == 2 and "max_steps=300, not 200" in result.output, result.output
    result = runner.invoke(app, [*other, "--patcher", '{"max_stepz": 1}'])
    assert result.exit_code == 2 and "max_stepz" in result.output, result.output
    result = runner.invoke(app, [*other, "--patcher", "{not json"])
    assert result.exit_code == 2 and "--patcher is not valid JSON" in result.output
    result = runner.invoke(app, [*other, "--neuron-activation", "gelu"])
    assert result.exit_code == 2 and "neuron_activation='relu', not 'gelu'" in result.output
    assert (patch / "manifest.json").read_bytes() == before
