"""Does an exported patch answer as tpatcher does? Real edits, HF and llama.cpp.

    python benchmarks/export_fidelity.py --patch bench-out/realuse-template/tpatcher/state-30

Takes a saved patch of real edits (any patch directory of an embedded GGUF model), exports it
to a Hugging Face checkpoint and to a GGUF (deci layout), and reports:

* HF: the largest logit difference between the export and the patched model over every
  position of the edited prompts and of unrelated questions (float32);
* llama.cpp (when ``llama_cpp`` is installed): the share of edited prompts whose greedy
  answer equals tpatcher's, and the share of unrelated prompts whose greedy answer equals
  the same export without neurons (the base at the same quantisation: the float32 last FFN
  alone can flip a near-tie of the quantised base file).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from importlib import resources
from pathlib import Path

import torch

from tpatcher import Patcher, load_model
from tpatcher.answers import first_line, normalize_answer
from tpatcher.export import export_patch


def unrelated_prompts(count: int) -> list[str]:
    text = resources.files("tpatcher").joinpath("evaluation/general_questions.txt")
    questions = [q.strip() for q in text.read_text("utf-8").splitlines() if q.strip()]
    return [f"Question: {q}\nAnswer:" for q in questions[:count]]


def max_logit_gap(model_a, model_b, tokenizer, prompts: list[str]) -> float:
    gap = 0.0
    for prompt in prompts:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            a, b = model_a(**enc).logits, model_b(**enc).logits
        gap = max(gap, float((a - b).abs().max()))
    return gap


def llama_cpp_answers(path: Path, prompts: list[str], tokens: int, threads: int) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, seed=0, verbose=False)
    try:
        out = []
        for p in prompts:
            done = llm.create_completion(p, max_tokens=tokens, temperature=0.0)
            out.append(done["choices"][0]["text"])
        return out
    finally:
        llm.close()


def same(a: str, b: str) -> bool:
    return normalize_answer(first_line(a)) == normalize_answer(first_line(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", required=True, type=Path)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--unrelated", type=int, default=50)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    patcher = Patcher.load(model, tokenizer, args.patch)
    edited = [e.prompt for e in patcher.edits]
    unrelated = unrelated_prompts(args.unrelated)
    ours = [patcher.generate(p, args.tokens) for p in edited]
    summary: dict = {"patch": str(args.patch), "edits": len(edited), "neurons": patcher.num_neurons}
    with tempfile.TemporaryDirectory() as scratch:
        hf = export_patch(args.patch, args.model, Path(scratch) / "hf")
        from transformers import AutoModelForCausalLM

        exported = AutoModelForCausalLM.from_pretrained(hf).eval()
        summary["hf_max_logit_gap"] = max_logit_gap(model, exported, tokenizer, edited + unrelated)
        del exported
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            summary["llama_cpp"] = "not installed"
        else:
            empty = Path(scratch) / "empty"
            patcher.close()
            Patcher(model, tokenizer, patcher.config).save(empty)
            gguf = export_patch(args.patch, args.model, Path(scratch) / "m.gguf", "gguf")
            base = export_patch(empty, args.model, Path(scratch) / "b.gguf", "gguf")
            theirs = llama_cpp_answers(gguf, edited + unrelated, args.tokens, args.threads)
            plain = llama_cpp_answers(base, unrelated, args.tokens, args.threads)
            summary["gguf_edited_same_as_tpatcher"] = sum(
                same(a, b) for a, b in zip(theirs, ours, strict=False)
            ) / max(1, len(edited))
            summary["gguf_unrelated_same_as_base"] = sum(
                same(a, b) for a, b in zip(theirs[len(edited) :], plain, strict=True)
            ) / max(1, len(unrelated))
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
