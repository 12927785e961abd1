"""Tables and plots of benchmark results (rich for the terminal, matplotlib/Agg for PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

#: (column title, key in a method's summary); ``*_tf`` = teacher-forced, ``*_em`` = exact match,
#: ``*_chat`` = free answer through the chat template, ``*_q`` = free answer to the bare question
COLUMNS = (
    ("items", "items"),
    ("edits", "edits"),
    ("SR tf", "sr_tf"),
    ("SR em", "sr_em"),
    ("GR tf", "gr_tf"),
    ("GR em", "gr_em"),
    ("ER tf", "er_tf"),
    ("ER em", "er_em"),
    ("Rel tf", "rel_tf"),
    ("Rel em", "rel_em"),
    ("Gen tf", "gen_tf"),
    ("Gen em", "gen_em"),
    ("Loc tf", "loc_tf"),
    ("Loc em", "loc_em"),
    ("Rel chat", "rel_chat"),
    ("Gen chat", "gen_chat"),
    ("Loc chat", "loc_chat"),
    ("Rel q", "rel_q"),
    ("Gen q", "gen_q"),
    ("General same", "general_same"),
    ("TrainR tf", "trainr_tf"),
    ("TrainR em", "trainr_em"),
    ("TestR tf", "testr_tf"),
    ("TestR em", "testr_em"),
    ("PPL", "ppl"),
    ("PPL base", "ppl_base"),
    ("s/edit", "seconds_per_edit"),
)
CURVE_METRICS = ("rel", "gen", "loc", "er", "trainr", "testr")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def results_table(results: dict[str, Any]) -> Table:
    """One row per metric, one column per method (``-`` where undefined); narrow enough
    for an 80-column terminal with four methods."""
    task = results.get("task", {})
    table = Table(title=f"{task.get('task')} ({task.get('mode')}), {task.get('stream')} items")
    table.add_column("metric")
    methods = results.get("methods", {})
    for name in methods:
        table.add_column(name, justify="right")
    for title, key in COLUMNS:
        row = [
            _fmt(summary.get(key)) if summary.get("complete") else "(stopped)"
            for summary in methods.values()
        ]
        table.add_row(title, *row)
    return table


def markdown_table(results: dict[str, Any]) -> str:
    """The same table as :func:`results_table`, as GitHub Markdown (for BENCHMARKS.md), with
    the average of Rel, Gen and Loc (teacher-forced, exact match and chat; over the parts
    that are defined) and the device added."""
    methods = results.get("methods", {})
    rows = [["metric", *methods], ["---"] * (len(methods) + 1)]
    for title, key in COLUMNS:
        rows.append(
            [title]
            + [
                _fmt(summary.get(key)) if summary.get("complete") else "(stopped)"
                for summary in methods.values()
            ]
        )
    for kind in ("tf", "em", "chat"):
        averages = []
        for summary in methods.values():
            parts = [summary.get(f"{m}_{kind}") for m in ("rel", "gen", "loc")]
            known = [p for p in parts if p is not None]
            averages.append(
                _fmt(sum(known) / len(known)) if known and summary.get("complete") else "-"
            )
        rows.append([f"avg(Rel, Gen, Loc) {kind}", *averages])
    rows.append(["device", *[str(s.get("device", "cpu")) for s in methods.values()]])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def _running_mean(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values, 1):
        total += v
        out.append(total / i)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``sme_running.png`` (running mean of SR/GR against the number of edits) and
    ``metrics_vs_edits.png`` (Rel/Gen/Loc/ER/TrainR/TestR at each evaluation point)."""
    out_dir = Path(out_dir)
    methods = {k: v for k, v in results.get("methods", {}).items() if v.get("complete")}
    return [
        plot_running(methods, out_dir / "sme_running.png"),
        plot_curves(methods, out_dir / "metrics_vs_edits.png"),
    ]


def plot_running(methods: dict[str, dict[str, Any]], path: Path) -> Path:
    """Running mean of SR and GR over the edits, from each method's per-item records."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), squeeze=False)
    for col, metric in enumerate(("sr", "gr")):
        for row, way in enumerate(("tf", "em")):
            ax = axes[row][col]
            key = f"{metric}_{way}"
            for name, summary in methods.items():
                records = summary.get("records", [])
                values = [float(r[key]) for r in records if r["edited"] and key in r]
                if values:
                    ax.plot(range(1, len(values) + 1), _running_mean(values), label=name)
            ax.set_title(f"{metric.upper()} ({'teacher-forced' if way == 'tf' else 'exact match'})")
            ax.set_xlabel("edits")
            ax.set_ylim(-0.05, 1.05)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(methods: dict[str, dict[str, Any]], path: Path) -> Path:
    """The final-model metrics at each evaluation point of each method's curve."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(CURVE_METRICS), figsize=(3 * len(CURVE_METRICS), 6))
    for col, metric in enumerate(CURVE_METRICS):
        for row, way in enumerate(("tf", "em")):
            ax = axes[row][col]
            key = f"{metric}_{way}"
            for name, summary in methods.items():
                points = [
                    (p["n_edits"], p[key]) for p in summary["curve"] if p.get(key) is not None
                ]
                if points:
                    xs, ys = zip(*points, strict=True)
                    ax.plot(xs, ys, marker="o", label=name)
            ax.set_title(key)
            ax.set_xlabel("edits")
            if not ax.lines:
                ax.text(0.5, 0.5, "undefined", ha="center", va="center", transform=ax.transAxes)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
