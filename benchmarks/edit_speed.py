"""Seconds per edit (cached vs full-model loop) and generation latency with patch neurons.

CPU, the real SmolLM2-135M on real zsRE mistakes:
    python benchmarks/edit_speed.py --data ../shared/data --edits 20

GPU, a randomly initialised LLaMA-2-7B-shaped model in bf16 (weights built on the card):
    python benchmarks/edit_speed.py --random-llama7b --device cuda --tokenizer DIR --edits 20
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from tpatcher import Patcher, PatcherConfig
from tpatcher.config import neuron_activation_from_word
from tpatcher.demo_facts import FACTS, question_prompt
from tpatcher.layer import NeuronState
from tpatcher.ledger import PatcherCheckpoint
from tpatcher.memory import default_prompts


def zsre_stream(data: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Edit candidates from the first 400 records; memory texts from the other 400."""
    records = json.loads((data / "zsre" / "zsre_mend_train_800.json").read_text())
    edits = [(question_prompt(r["src"]), r["answers"][0]) for r in records[:400]]
    memory = [question_prompt(r["src"]) + " " + r["answers"][0] for r in records[400:]]
    return edits, memory


def time_edits(patcher: Patcher, stream: list[tuple[str, str]], count: int) -> list[dict]:
    """Edit the first ``count`` mistakes of the stream; one row per edit."""
    rows = []
    for prompt, target in stream:
        if len(rows) >= count:
            break
        if not patcher.is_mistake(prompt, target):
            continue
        if patcher.neurons.keys.device.type == "cuda":
            torch.cuda.synchronize()
        result = patcher.edit(prompt, target)
        rows.append(
            {
                "prompt": prompt,
                "target": target,
                "success": result.success,
                "seconds": result.seconds,
                "steps": result.steps,
                "neurons": result.neurons,
            }
        )
    return rows


def summary(rows: list[dict]) -> dict:
    seconds = [r["seconds"] for r in rows]
    return {
        "edits": len(rows),
        "success": sum(r["success"] for r in rows),
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "median_steps": statistics.median(r["steps"] for r in rows),
    }


def generation_latency(
    patcher: Patcher, counts: tuple[int, ...], prompt: str, tokens: int, rounds: int
) -> dict[str, float]:
    """Median seconds to generate ``tokens`` tokens with each count of random patch neurons.

    The counts are interleaved round by round, so drifting clocks or a busy neighbour affect
    every count alike instead of the one measured last.
    """
    saved = patcher.checkpoint()
    like = patcher.neurons.keys  # (0, d) on the patch's device, in its dtype
    d, device = like.shape[1], like.device
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.01).to(device=device, dtype=like.dtype)

    states = {
        n: NeuronState(
            keys=rand(n, d),
            values=rand(n, d),
            up_keys=rand(n, d) if saved.state.up_keys is not None else None,
            biases=rand(n) if saved.state.biases is not None else None,
            owners=("bench",) * n,
        )
        for n in counts
    }
    enc = patcher.tokenizer(prompt, return_tensors="pt").to(patcher.input_device)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            patcher.model.generate(
                **enc,
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=patcher.tokenizer.eos_token_id,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    times: dict[int, list[float]] = {n: [] for n in counts}
    try:
        run()  # warm-up
        for _ in range(rounds):
            for n in counts:
                patcher.restore(PatcherCheckpoint(states[n], (), saved.edits_attempted))
                times[n].append(run())
    finally:
        patcher.restore(saved)
    return {str(n): statistics.median(t) for n, t in times.items()}


def build(args: argparse.Namespace):
    if not args.random_llama7b:
        from tpatcher import load_model

        model, tokenizer = load_model(args.model)
        edits, memory = zsre_stream(Path(args.data))
        return model, tokenizer, edits, memory, f"{args.model} (float32)"
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=len(tokenizer),
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    words = ["Paris", "Berlin", "Canberra", "Ottawa", "Tokyo", "Lima", "Oslo", "Cairo"]
    facts = list(FACTS) * 3
    edits = [(question_prompt(f.question), words[i % len(words)]) for i, f in enumerate(facts)]
    memory = default_prompts()
    return model, tokenizer, edits, memory, "random LLaMA-2-7B shape (bf16, 6.9B parameters)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="../shared/data")
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--full-edits", type=int, default=None, help="edits for the full loop")
    parser.add_argument("--random-llama7b", action="store_true")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder for --random-llama7b")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--gen-runs", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--vocab-candidates", type=int, default=PatcherConfig.vocab_candidates)
    parser.add_argument(
        "--neuron-activation",
        default=PatcherConfig.neuron_activation,
        help="'auto' (default), 'ffn' (the FFN's own: the paper's form) or an activation name",
    )
    parser.add_argument(
        "--max-neurons-per-edit",
        type=int,
        default=PatcherConfig.max_neurons_per_edit,
        help="neuron cap per edit (the reference implementation's is 5)",
    )
    args = parser.parse_args()
    torch.set_grad_enabled(True)

    model, tokenizer, edits, memory, label = build(args)
    if args.device != "cpu" and not args.random_llama7b:
        model.to(args.device)
    device_name = (
        torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    results: dict = {"model": label, "device": device_name, "torch": torch.__version__}
    results["neuron_activation"] = args.neuron_activation
    results["max_neurons_per_edit"] = args.max_neurons_per_edit
    for loop in ("cached", "full"):
        config = PatcherConfig(
            training_loop=loop,
            vocab_candidates=args.vocab_candidates,
            neuron_activation=neuron_activation_from_word(args.neuron_activation),
            max_neurons_per_edit=args.max_neurons_per_edit,
        )
        patcher = Patcher(model, tokenizer, config, memory_texts=memory)
        _ = patcher.memory  # built before timing
        count = args.edits if loop == "cached" else (args.full_edits or args.edits)
        rows = time_edits(patcher, edits, count)
        results[loop] = summary(rows)
        results[f"{loop}_rows"] = rows
        if loop == "cached":
            prompt = edits[0][0]
            results["generation"] = generation_latency(
                patcher, (0, 100, 1000), prompt, args.gen_tokens, args.gen_runs
            )
        patcher.close()
    results["speedup_full_over_cached"] = (
        results["full"]["median_s"] / results["cached"]["median_s"]
    )

    print(f"\n{label} on {device_name}, torch {torch.__version__}")
    print("| loop | edits | fixed | median s/edit | min | max | median steps |")
    print("|---|---|---|---|---|---|---|")
    for loop in ("cached", "full"):
        s = results[loop]
        print(
            f"| {loop} | {s['edits']} | {s['success']} | {s['median_s']:.3f} | "
            f"{s['min_s']:.3f} | {s['max_s']:.3f} | {s['median_steps']:.0f} |"
        )
    print(f"\nfull/cached median ratio: {results['speedup_full_over_cached']:.1f}x")
    gen = results["generation"]
    print(f"\n| patch neurons | {args.gen_tokens}-token generation, median s | slowdown |")
    print("|---|---|---|")
    for n, seconds in gen.items():
        print(f"| {n} | {seconds:.4f} | {100 * (seconds / gen['0'] - 1):+.1f}% |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
