"""UCI Student Performance (Cortez & Silva 2008): two Portuguese schools, two subjects.

Files: ``student-mat.csv`` and ``student-por.csv`` (``;``-separated, as published).
Natural groups: school x subject, ``GP_mat``, ``GP_por``, ``MS_mat``, ``MS_por``
(default institution names ``uci_GP_mat`` ...).

Modality ``tabular`` (built-in ``tabular`` encoder): 13 numeric columns (15 with
``prior_grades = "G1G2"``) scaled to 0..1 by the ranges in ``student.txt`` (no statistic
of the data is used, so no test row leaks into the scaling), and 18 categorical columns
(:data:`CATEGORICAL`, including the subject). Tasks: ``g3`` = ``(G3 - 10) / 5`` (0 is
the pass mark, one unit is five grade points) and ``pass`` = ``G3 >= 10`` (2 classes).

Shared students: about 380 students are in both files. They are matched on the 13
attributes UCI's merge script uses (:data:`IDENTITY`) and each match is one *unit*: the
train/test decision is taken once per unit, so a student is never in train in one
institution and in test in another.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .common import Pool, RealSource, Table, count, record_fixes

FILES = {"mat": "student-mat.csv", "por": "student-por.csv"}
# Numeric columns and their documented ranges (student.txt), scaled to 0..1.
NUMERIC = {
    "age": (15, 22), "Medu": (0, 4), "Fedu": (0, 4), "traveltime": (1, 4), "studytime": (1, 4),
    "failures": (0, 4), "famrel": (1, 5), "freetime": (1, 5), "goout": (1, 5), "Dalc": (1, 5),
    "Walc": (1, 5), "health": (1, 5), "absences": (0, 93),
}
GRADES = ("G1", "G2")  # period grades 0..20, features only with prior_grades
YES_NO = ("no", "yes")
CATEGORICAL: dict[str, tuple[str, ...]] = {
    "school": ("GP", "MS"), "sex": ("F", "M"), "address": ("U", "R"), "famsize": ("LE3", "GT3"),
    "Pstatus": ("T", "A"), "Mjob": ("teacher", "health", "services", "at_home", "other"),
    "Fjob": ("teacher", "health", "services", "at_home", "other"),
    "reason": ("home", "reputation", "course", "other"), "guardian": ("mother", "father", "other"),
    **{c: YES_NO for c in ("schoolsup", "famsup", "paid", "activities", "nursery", "higher", "internet", "romantic")},
}
SUBJECTS = ("mat", "por")  # the 18th categorical column
IDENTITY = ("school", "sex", "age", "address", "famsize", "Pstatus", "Medu", "Fedu", "Mjob", "Fjob", "reason", "nursery", "internet")
PRIOR = {"none": (), "G1": ("G1",), "G1G2": ("G1", "G2")}


class UCIStudent(RealSource):
    name = "uci_student"
    default_prefix = "uci_"
    natural_modalities = ("tabular",)
    natural_tasks = ("g3", "pass")
    example_groups = ("MS_mat",)

    def __init__(self, folder: str = "uci_student_performance", prior_grades: str = "none", unknown_values: str = "missing", **options: Any):
        super().__init__(**options)
        # The published student-por.csv has one corrupt cell (row 8, famsize "2"):
        # "missing" keeps the row with famsize missing and reports it; "error" stops.
        self.unknown_values = unknown_values
        if prior_grades not in PRIOR:
            raise ValueError(f"data source 'uci_student': prior_grades must be one of {list(PRIOR)} (setup C, B, A), got {prior_grades!r}")
        self.folder, self.prior = folder, PRIOR[prior_grades]

    @property
    def n_numeric(self) -> int:
        return len(NUMERIC) + len(self.prior)

    @property
    def cardinalities(self) -> list[int]:
        return [len(v) for v in CATEGORICAL.values()] + [len(SUBJECTS)]

    def read(self, root: Path | None) -> Pool:
        folder = self.data_dir(root, self.folder)
        numeric, categorical, g3, groups, keys = [], [], [], [], []
        report: dict[str, Any] = {}
        seen: dict[str, set] = {}
        for subject, file in FILES.items():
            t = Table(folder / file, [*NUMERIC, *GRADES, "G3", *CATEGORICAL], delimiter=";", unknown=self.unknown_values)
            seen[subject] = set()
            for row, cells in t:
                nums = [(t.number(cells, row, c, lo, hi) - lo) / (hi - lo) for c, (lo, hi) in NUMERIC.items()]
                nums[-1] = math.log1p(nums[-1] * 93) / math.log1p(93)  # absences: long tail, log scale
                nums += [t.number(cells, row, c, 0, 20) / 20 for c in self.prior]
                numeric.append(nums)
                categorical.append([t.category(cells, row, c, v) for c, v in CATEGORICAL.items()] + [SUBJECTS.index(subject)])
                g3.append(t.number(cells, row, "G3", 0, 20))
                school = cells[t.col["school"]].strip()
                groups.append(f"{school}_{subject}")
                key = tuple(cells[t.col[c]].strip() for c in IDENTITY)
                keys.append(key)
                seen[subject].add(key)
                count(report, file, "rows_read")
            record_fixes(report, t)
        # One unit per identity: the same student in both files shares a unit id.
        unit_of: dict[tuple, int] = {}
        units = torch.tensor([unit_of.setdefault(k, len(unit_of)) for k in keys])
        report["shared_students"] = len(seen["mat"] & seen["por"])
        grade = torch.tensor(g3)
        return Pool(
            inputs={"tabular": {"numeric": torch.tensor(numeric, dtype=torch.float32), "categorical": torch.tensor(categorical)}},
            targets={"g3": (grade - 10) / 5, "pass": (grade >= 10).long()},
            groups=groups,
            units=units,
            report=report,
        )
