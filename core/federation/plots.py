"""Plots of a run: validation learning curves, per-institution metrics (with 95%
intervals over seeds), expert usage per institution x task. Each function draws to a
file path or a binary stream (the HTML report embeds the PNG bytes)."""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402


def save(fig: Any, path: Path | IO[bytes]) -> Path | IO[bytes]:
    """Lay out, write as PNG (a file or a buffer the HTML report embeds) and free ``fig``."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path


def write_plots(run_dir: Path, curves: list[dict], summary: dict[str, Any], routing: dict, experts: list[str]) -> list[Path]:
    out = [learning_curves(run_dir / "learning_curves.png", curves, summary)]
    out.append(per_institution(run_dir / "institutions.png", summary))
    out.append(expert_usage(run_dir / "expert_usage.png", routing, experts))
    return out


def learning_curves(path: Path | IO[bytes], curves: list[dict], summary: dict[str, Any]) -> Path | IO[bytes]:
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = summary[task]["metric"]
        for name in summary[task]["institutions"]:
            evaluated = [c for c in curves if name in c.get("metrics", {})]
            xs = [c["round"] for c in evaluated]
            ys = [c["metrics"][name][task][metric] for c in evaluated]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_title(f"{task}: validation {metric}")
        ax.set_xlabel("round")
        ax.legend(fontsize=6)
    return save(fig, path)


def expert_usage(path: Path | IO[bytes], routing: dict, experts: list[str], of: str = "task") -> Path | IO[bytes]:
    """Rows: institution/task (or institution/modality, ``of="modality"``); columns:
    experts; cells: share of routed tokens."""
    labels, rows = [], []
    for name, per_label in routing.items():
        for label, counts in per_label.items():
            total = sum(counts) or 1
            labels.append(f"{name}/{label}")
            rows.append([c / total for c in counts])
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(experts), 0.9 + 0.3 * len(labels)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.colorbar(im, ax=ax, label="share of tokens")
    ax.set_title(f"expert usage per {of} (test data, share of each row's tokens)")
    return save(fig, path)


def validation_loss_curves(path: Path | IO[bytes], curves: dict[str, list[list[tuple[int, float]]]]) -> Path | IO[bytes]:
    """Mean validation loss over institutions per round, one line per method (the mean
    over seeds), with the seeds' range shaded. ``curves``: method -> per seed [(x, loss)]."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for method, per_seed in curves.items():
        xs = sorted({x for seed in per_seed for x, _ in seed})
        by_x = [[dict(seed)[x] for seed in per_seed if x in dict(seed)] for x in xs]
        ax.plot(xs, [sum(v) / len(v) for v in by_x], marker=".", label=method)
        if len(per_seed) > 1:
            ax.fill_between(xs, [min(v) for v in by_x], [max(v) for v in by_x], alpha=0.2)
    ax.set_xlabel("round")
    ax.set_ylabel("mean validation loss")
    ax.set_title("validation loss per method (seeds' range shaded)")
    ax.legend(fontsize=7)
    return save(fig, path)


def per_institution(path: Path | IO[bytes], tasks: dict[str, Any]) -> Path | IO[bytes]:
    """Per task, each institution's primary metric per method, with its 95% interval over
    seeds as an error bar where there is one. ``tasks``: one seed's ``report.summarize``
    (a number per cell) or ``report.across_seeds``'s ``tasks`` (mean, lo, hi per cell)."""
    names = list(tasks)
    fig, axes = plt.subplots(1, len(names), figsize=(3.8 * len(names), 3.4), squeeze=False)
    for ax, task in zip(axes[0], names):
        rows = tasks[task]["institutions"]
        methods = list(tasks[task]["summary"])
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            cells = [r[m] if isinstance(r[m], dict) else {"mean": r[m], "lo": None} for r in rows.values()]
            err = [[c["mean"] - c["lo"] for c in cells], [c["hi"] - c["mean"] for c in cells]] if cells[0]["lo"] is not None else None
            ax.bar([i + j * width for i in range(len(rows))], [c["mean"] for c in cells], width, yerr=err, capsize=2, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], list(rows), rotation=30, ha="right", fontsize=7)
        arrow = "higher" if tasks[task]["higher_is_better"] else "lower"
        ax.set_title(f"{task}: {tasks[task]['metric']} ({arrow} is better)", fontsize=9)
    axes[0][0].legend(fontsize=6)
    return save(fig, path)
