"""Size and generation speed of exported models: HF checkpoint and llama.cpp GGUF vs the base.

The neurons are random (keys random, values 1e-6 so the text is the base model's and every run
generates the same tokens): speed depends on the FFN width only, not on what neurons learned.
CPU, the real SmolLM2-135M, one thread:

    python benchmarks/export_speed.py --neurons 100 1000 --tokens 64 --threads 1

llama.cpp numbers need ``pip install llama-cpp-python`` (the ``export`` extra); they are
skipped without it.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tpatcher.export import _write_hf, last_ffn_arrays, source_gguf
from tpatcher.export_gguf import write_gguf
from tpatcher.ffn_site import FFNSite
from tpatcher.layer import NeuronState
from tpatcher.merging import merge_into
from tpatcher.models import load_model

PROMPT = "The history of the printing press begins"


def random_state(site: FFNSite, n: int, seed: int = 0) -> NeuronState:
    """``n`` gated neurons with random keys and negligible values."""
    g = torch.Generator().manual_seed(seed)
    d = site.hidden_size

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / d**0.5

    return NeuronState(
        keys=rand(n, d),
        values=rand(n, d) * 1e-6,
        up_keys=rand(n, d),
        owners=tuple(f"e{i}" for i in range(n)),
    )


def folder_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def hf_tokens_per_s(folder: Path, tokens: int, repeats: int) -> float:
    """Greedy generation speed of a saved checkpoint (exactly ``tokens`` new tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(PROMPT, return_tensors="pt")
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=4, do_sample=False)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(**enc, **kwargs)
            times.append(time.perf_counter() - start)
    return tokens / statistics.median(times)


def llama_cpp_tokens_per_s(path: Path, tokens: int, repeats: int, threads: int) -> float:
    """Greedy decoding speed in llama.cpp: exactly ``tokens`` tokens (EOS does not stop it)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, n_threads=threads, seed=0, verbose=False)
    prompt = llm.tokenize(PROMPT.encode(), special=True)

    def decode(count: int) -> float:
        llm.reset()
        start = time.perf_counter()
        for _token in itertools.islice(llm.generate(prompt, temp=0.0, reset=True), count):
            pass
        return time.perf_counter() - start

    try:
        decode(4)  # warm-up
        times = [decode(tokens) for _ in range(repeats)]
    finally:
        llm.close()
    return tokens / statistics.median(times)


def run(args: argparse.Namespace, scratch: Path) -> dict:
    torch.set_num_threads(args.threads)
    base_model, tok = load_model("smollm2-135m")
    try:
        import llama_cpp  # noqa: F401

        have_llama_cpp = not args.skip_llama_cpp
    except ImportError:
        have_llama_cpp = False
    rows = []
    for n in [0, *args.neurons]:
        model = copy.deepcopy(base_model)
        site = FFNSite(model)
        merge_into(model, site, random_state(site, n), "relu")
        out = scratch / f"hf-{n}"
        _write_hf(model, tok, site, out, 64, {"neurons": n})
        row = {
            "neurons": n,
            "intermediate_size": model.config.intermediate_size,
            "hf_mb": round(folder_mb(out), 1),
            "hf_tokens_per_s": round(hf_tokens_per_s(out, args.tokens, args.repeats), 2),
        }
        if have_llama_cpp:
            with source_gguf("smollm2-135m") as source:
                for layout in ("deci", "uniform"):
                    path = scratch / f"{layout}-{n}.gguf"
                    target = source if n == 0 else path
                    if n:
                        write_gguf(source, path, last_ffn_arrays(site), layout=layout)
                    row[f"gguf_{layout}_mb"] = round(folder_mb(target), 1)
                    rate = llama_cpp_tokens_per_s(target, args.tokens, args.repeats, args.threads)
                    row[f"gguf_{layout}_tokens_per_s"] = round(rate, 2)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del model
    return {
        "machine": f"{platform.machine()} {platform.processor()}, "
        f"{torch.get_num_threads()} torch thread(s)",
        "command": "python benchmarks/export_speed.py " + " ".join(args.argv),
        "tokens": args.tokens,
        "load_average_at_end": os.getloadavg(),
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--neurons", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--json", type=Path, help="Also write the results here")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    with tempfile.TemporaryDirectory(prefix="tpatcher-export-bench-") as scratch:
        results = run(args, Path(scratch))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
