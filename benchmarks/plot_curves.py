"""One metrics-against-edits plot from several result files of the same task.

Methods of one task are often run separately (other settings, other machines, another
``--out``); this draws their curves side by side from the committed summaries:

    python benchmarks/plot_curves.py benchmarks/results/sme_counterfact_t1000.json \\
        benchmarks/results/sme_counterfact_relu_t1000.json:relu \\
        benchmarks/results/sme_counterfact_grace_t1000.json \\
        --out benchmarks/results/sme_counterfact_all_metrics_vs_edits.png

``FILE:SUFFIX`` names that file's methods ``method (SUFFIX)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tpatcher.evaluation.report import plot_curves


def merged_methods(specs: list[str]) -> dict[str, dict]:
    """Completed methods of every file, keyed by a label unique across the files."""
    methods: dict[str, dict] = {}
    tasks = set()
    for spec in specs:
        path, sep, suffix = spec.rpartition(":")
        if not sep or not Path(path).is_file():  # no suffix (the path may hold a colon)
            path, suffix = spec, ""
        results = json.loads(Path(path).read_text("utf-8"))
        tasks.add((results["task"]["task"], results["task"]["mode"]))
        for name, summary in results["methods"].items():
            if not summary.get("complete"):
                continue
            label = f"{name} ({suffix})" if suffix else name
            if label in methods:
                raise SystemExit(f"two files give {label!r}; add :SUFFIX to one of them")
            methods[label] = summary
    if len(tasks) > 1:
        raise SystemExit(f"the files hold different tasks: {sorted(tasks)}")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="results.json files, each optionally FILE:SUFFIX")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()
    path = plot_curves(merged_methods(args.files), Path(args.out))
    print(path)


if __name__ == "__main__":
    main()
