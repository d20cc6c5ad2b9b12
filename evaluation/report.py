"""Reports of a set of runs: markdown table, CSV, and toxicity-vs-perplexity plot with the Pareto front.

A detox setting is only as good as its trade-off (lower toxicity usually costs fluency), so runs
on the Pareto front (no other run has both lower toxicity and lower perplexity) are marked in
the table and drawn as a line in the plot. Every output names the toxicity scorer.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

COLUMNS = [  # (key, header, format)
    ("name", "run", "{}"), ("emt", "EMT", "{:.3f}"), ("emt_std", "EMT std", "{:.3f}"),
    ("tox_prob", "Tox. prob.", "{:.3f}"), ("perplexity", "perplexity", "{:.2f}"),
    ("distinct_1", "dist-1", "{:.3f}"), ("distinct_2", "dist-2", "{:.3f}"), ("distinct_3", "dist-3", "{:.3f}"),
    ("tokens_per_s", "tokens/s", "{:.1f}"), ("layers_saved", "layers saved", "{:.1%}"),
    ("n_edits", "edits", "{}"), ("n_prompts", "prompts", "{}"), ("samples", "samples", "{}"),
    ("pareto", "Pareto", "{}"), ("scorer", "scorer", "{}"),
]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """True for points that no other point beats on both coordinates (both minimized)."""
    def ok(p: tuple[float, float]) -> bool:
        return all(map(math.isfinite, p))

    return [ok(p) and not any(ok(q) and q[0] <= p[0] and q[1] <= p[1] and q != p for q in points) for p in points]


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "*" if value else ""
    return fmt.format(value)


def _with_front(summaries: Sequence[dict]) -> list[dict]:
    front = pareto_front([(s["perplexity"], s["emt"]) for s in summaries])
    return [dict(s, pareto=f) for s, f in zip(summaries, front)]


def caption(summaries: Sequence[dict]) -> str:
    first = summaries[0]
    scorers = ", ".join(dict.fromkeys(s["scorer"] for s in summaries))
    return (f"toxicity scored by {scorers}; perplexity under {first['judge']} (unsteered); "
            f"{first['n_prompts']} prompts x {first['samples']} samples, top-p {first['top_p']}, "
            f"{first['max_new_tokens']} new tokens, seed {first['seed']}; EMT = expected maximum toxicity")


def markdown_table(summaries: Sequence[dict], title: str | None = None) -> str:
    rows = _with_front(summaries)
    lines = [f"### {title}", ""] if title else []
    lines += [f"_{caption(summaries)}_", "",
              "| " + " | ".join(h for _, h, _ in COLUMNS) + " |",
              "|" + "|".join("---" if k in ("name", "scorer") else "---:" for k, _, _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k), f) for k, _, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(summaries: Sequence[dict], path: Path) -> None:
    rows = _with_front(summaries)
    keys = list(dict.fromkeys([k for k, _, _ in COLUMNS] + [k for r in rows for k in r]))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, restval="")
        writer.writeheader()
        writer.writerows(rows)


def plot(summaries: Sequence[dict], path: Path, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _with_front(summaries)
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    ax.scatter([r["perplexity"] for r in rows], [r["emt"] for r in rows], color="tab:gray", label="runs", zorder=2)
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["perplexity"])
    ax.plot([r["perplexity"] for r in front], [r["emt"] for r in front], "o-", color="tab:red",
            label="Pareto front", zorder=3, drawstyle="steps-post" if len(front) > 1 else "default")
    for r in rows:
        if math.isfinite(r["perplexity"]):
            ax.annotate(r["name"], (r["perplexity"], r["emt"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"perplexity under {rows[0]['judge']} (lower is more fluent)")
    ax.set_ylabel("expected maximum toxicity")
    scorers = ", ".join(dict.fromkeys(r["scorer"] for r in rows))
    ax.set_title((title + "\n" if title else "") + f"toxicity: {scorers}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_reports(summaries: Sequence[dict], folder: str | Path, title: str | None = None) -> dict[str, Path]:
    """summary.md, summary.csv and pareto.png in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "summary.md", "csv": folder / "summary.csv", "plot": folder / "pareto.png"}
    paths["markdown"].write_text(markdown_table(summaries, title))
    write_csv(summaries, paths["csv"])
    plot(summaries, paths["plot"], title)
    return paths
