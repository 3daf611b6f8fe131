"""PNG plots of a run: learning curves, per-institution metrics, expert usage heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt  # noqa: E402


def write_plots(run_dir: Path, curves: list[dict], summary: dict[str, Any], routing: dict, experts: list[str]) -> list[Path]:
    out = [learning_curves(run_dir / "learning_curves.png", curves, summary)]
    out.append(per_institution(run_dir / "institutions.png", summary))
    out.append(expert_usage(run_dir / "expert_usage.png", routing, experts))
    return out


def learning_curves(path: Path, curves: list[dict], summary: dict[str, Any]) -> Path:
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = summary[task]["metric"]
        for name in summary[task]["institutions"]:
            xs = [c["round"] for c in curves if name in c["metrics"]]
            ys = [c["metrics"][name][task][metric] for c in curves if name in c["metrics"]]
            ax.plot(xs, ys, marker=".", label=name)
        ax.set_title(f"{task}: {metric}")
        ax.set_xlabel("round")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def per_institution(path: Path, summary: dict[str, Any]) -> Path:
    tasks = list(summary)
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = summary[task]["institutions"]
        methods = list(summary[task]["summary"])
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            ax.bar([i + j * width for i in range(len(rows))], [r[m] for r in rows.values()], width, label=m)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], list(rows), rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{task}: {summary[task]['metric']}")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def expert_usage(path: Path, routing: dict, experts: list[str]) -> Path:
    """Rows: institution/task; columns: experts; cells: share of routed tokens."""
    labels, rows = [], []
    for name, per_task in routing.items():
        for task, counts in per_task.items():
            total = sum(counts) or 1
            labels.append(f"{name}/{task}")
            rows.append([c / total for c in counts])
    fig, ax = plt.subplots(figsize=(1 + 0.7 * len(experts), 0.9 + 0.3 * len(labels)))
    im = ax.imshow(rows, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(experts)), experts, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    fig.colorbar(im, ax=ax, label="share of tokens")
    ax.set_title("expert usage (test data)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
