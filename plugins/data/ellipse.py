"""ELLIPSE essays (Crossley et al. 2023): English-learner essays with analytic scores.

File: ``ELLIPSE_Final_github_test.csv`` (standard CSV, quoted multi-line essays).
Modality ``text``: the raw essay strings (the built-in ``text`` encoder tokenizes).
Task ``essay_scores``: the seven human scores :data:`SCORES` (1.0-5.0 in 0.5 steps),
scaled to ``(score - 3) / 2`` so they lie in -1..1; use the ``multi_regression`` task
with ``n_outputs = 7`` and ``output_names = SCORES``.

Natural groups: ``by = "grade"`` (default): grade levels ``8`` ... ``12`` (names
``ellipse_grade8`` ...; grade 9 has only 6 essays: merge it with the institutions option,
e.g. ``{ellipse_grade9_10 = ["9", "10"]}``); ``by = "prompt"``: the 44 writing prompts
dealt into ``prompt_groups`` groups (default 4, names ``ellipse_prompts0`` ...), largest
prompt first, each to the currently smallest group, so the groups are of similar size
and every prompt is in exactly one group.
An essay with a blank score is dropped and counted; a score outside 1..5 is an error.
"""

from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from .common import Pool, RealSource, Table, count

FILE = "ELLIPSE_Final_github_test.csv"
SCORES = ("Overall", "Cohesion", "Syntax", "Vocabulary", "Phraseology", "Grammar", "Conventions")


class Ellipse(RealSource):
    name = "ellipse"
    default_prefix = "ellipse_"
    natural_modalities = ("text",)
    natural_tasks = ("essay_scores",)
    example_groups = ("grade8",)

    def __init__(self, folder: str = "ellipse", file: str = FILE, by: str = "grade", prompt_groups: int = 4, **options: Any):
        super().__init__(**options)
        if by not in ("grade", "prompt"):
            raise ValueError(f"data source 'ellipse': by must be 'grade' or 'prompt', got {by!r}")
        if prompt_groups < 1:
            raise ValueError(f"data source 'ellipse': prompt_groups must be >= 1, got {prompt_groups}")
        self.folder, self.file, self.by, self.prompt_groups = folder, file, by, prompt_groups

    def read(self, root: Path | None) -> Pool:
        csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 1 << 28)))  # essays are long fields
        t = Table(self.data_dir(root, self.folder) / self.file, ["full_text", "grade", "prompt", *SCORES])
        texts, scores, grades, prompts = [], [], [], []
        report: dict[str, Any] = {}
        for row, cells in t:
            count(report, self.file, "rows_read")
            blank = [c for c in SCORES if cells[t.col[c]].strip() == ""]
            if blank:
                count(report, self.file, "dropped: score missing")
                continue
            text = cells[t.col["full_text"]]
            if not text.strip():
                count(report, self.file, "dropped: empty essay")
                continue
            scores.append([(t.number(cells, row, c, 1, 5) - 3) / 2 for c in SCORES])
            grades.append(str(int(t.number(cells, row, "grade", 1, 12))))
            prompts.append(cells[t.col["prompt"]].strip())
            texts.append(text)
        if self.by == "grade":
            groups = [f"grade{g}" for g in grades]
        else:
            groups = [f"prompts{i}" for i in _deal(prompts, self.prompt_groups)]
        return Pool(inputs={"text": texts}, targets={"essay_scores": torch.tensor(scores, dtype=torch.float32)}, groups=groups, report=report)


def _deal(prompts: list[str], k: int) -> list[int]:
    """Group index of each row: prompts, largest first, each to the smallest group so far
    (ties by name, so the result does not depend on file order)."""
    sizes = [0] * k
    group_of = {}
    for prompt, n in sorted(Counter(prompts).items(), key=lambda kv: (-kv[1], kv[0])):
        j = min(range(k), key=lambda i: (sizes[i], i))
        group_of[prompt] = j
        sizes[j] += n
    return [group_of[p] for p in prompts]
