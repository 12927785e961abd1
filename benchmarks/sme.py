"""The issue's target experiments: sequential editing with every method, printed as tables.

    python benchmarks/sme.py zsre          # zsRE, T=500, fix the model's mistakes (the paper)
    python benchmarks/sme.py counterfact   # CounterFact, T=1000, counterfactual edits
    python benchmarks/sme.py factcheck     # claims from CounterFact, fix the classifier's mistakes
    python benchmarks/sme.py small         # zsRE, T=20, a quick check (minutes on CPU)

Results (JSON, PNG plots, checkpoints) go to ``bench-out/<preset>``; rerunning a preset
resumes it. Methods whose module is missing are reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from tpatcher.evaluation.protocol import METHODS, BenchSettings, method_available, run_benchmark
from tpatcher.evaluation.report import markdown_table, results_table

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {
    "zsre": dict(task="zsre", edits=500, heldout=100, eval_every=125, batch_size=32),
    "counterfact": dict(task="counterfact", edits=1000, heldout=200, eval_every=250, batch_size=32),
    "factcheck": dict(task="factcheck", edits=1000, heldout=200, eval_every=250, batch_size=64),
    "small": dict(task="zsre", edits=20, heldout=20, memory_records=200, eval_every=10),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device for every model (cuda)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    parser.add_argument(
        "--eval-every", type=int, default=None, help="items between curve points (preset's)"
    )
    parser.add_argument(
        "--stop-after", type=int, default=None, help="process at most N items, then checkpoint"
    )
    parser.add_argument(
        "--patcher",
        default="{}",
        help="PatcherConfig overrides as JSON, e.g. '{\"include_default_memory\": true}' "
        "(use another --out: changed settings restart the method there)",
    )
    parser.add_argument(
        "--edit-format",
        choices=("template", "chat", "joint"),
        default="template",
        help="edit the template prompt, the question through the chat template (service), or "
        "the template prompt trained with the chat turn and the bare question (tpatcher only)",
    )
    parser.add_argument(
        "--no-real-use", action="store_true", help="skip the free-answer (chat) metrics"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console()
    methods = [m for m in args.methods.split(",") if m]
    missing = [m for m in methods if m in METHODS and not method_available(m)]
    if missing:
        console.print(f"[yellow]skipping {', '.join(missing)}: editor module missing[/yellow]")
        methods = [m for m in methods if m not in missing]
    settings = BenchSettings(
        methods=methods,
        data_dir=args.data,
        out_dir=args.out or str(ROOT / "bench-out" / args.preset),
        seed=args.seed,
        device=args.device,
        patcher=json.loads(args.patcher),
        edit_format=args.edit_format,
        real_use=not args.no_real_use,
        **PRESETS[args.preset],
    )
    if args.eval_every is not None:
        settings.eval_every = args.eval_every
    start = time.perf_counter()

    def on_item(method: str, done: int, total: int, record: dict) -> None:
        if done % 10 == 0 or done == total:
            console.log(f"{method}: {done}/{total} items ({time.perf_counter() - start:.0f} s)")

    results = run_benchmark(
        settings,
        stop_after=args.stop_after,
        on_item=on_item,
        on_status=console.log,
        plots=not args.no_plots,
    )
    console.print(results_table(results))
    if args.markdown:
        print(markdown_table(results))
    console.print(f"{settings.out_dir}/results.json, {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
