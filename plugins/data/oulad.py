"""OULAD, the Open University Learning Analytics Dataset (Kuzilek et al. 2017).

Files: ``studentInfo.csv``, ``studentRegistration.csv``, ``assessments.csv``,
``studentAssessment.csv`` (as published). One row = one student's registration on one
module presentation. Natural groups: ``code_module`` (``by = "module"``, default; 7
groups ``AAA`` ... ``GGG``) or ``region`` (``by = "region"``; 13 groups, spaces become
``_``). Default institution names: ``oulad_AAA`` ...

Modalities:
- ``tabular``: numeric ``num_of_prev_attempts / 6``, ``studied_credits / 600``,
  ``date_registration / 100`` (NaN if blank), ``assessments submitted before the cutoff
  / 10``; categorical :data:`CATEGORICAL` (``imd_band`` blank = -1 missing).
- ``interactions``: the assessments submitted on or before ``cutoff_day`` (default 90)
  in time order, most recent ``max_len`` kept; skill = (module, assessment type) so
  ``num_skills = 21``; correct = score >= 40 (the OU pass mark). A student with no
  submission before the cutoff has ``present["interactions"] = False``.

Tasks: ``final_result`` (0 Withdrawn, 1 Fail, 2 Pass, 3 Distinction) and ``withdrawal``
(final_result == Withdrawn, 2 classes). Leakage: ``date_unregistration`` and
everything after the cutoff (later assessments, exam) are never read as features.
Submissions with a blank score are dropped and counted (``score missing``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .common import DataFileError, Pool, RealSource, Table, count, record_fixes

MODULES = ("AAA", "BBB", "CCC", "DDD", "EEE", "FFF", "GGG")
ASSESSMENT_TYPES = ("TMA", "CMA", "Exam")
RESULTS = ("Withdrawn", "Fail", "Pass", "Distinction")
CATEGORICAL: dict[str, tuple[str, ...]] = {
    "code_module": MODULES,
    "presentation": ("B", "J"),  # February or October start (from code_presentation)
    "gender": ("M", "F"),
    "region": (
        "East Anglian Region", "East Midlands Region", "Ireland", "London Region", "North Region", "North Western Region",
        "Scotland", "South East Region", "South Region", "South West Region", "Wales", "West Midlands Region", "Yorkshire Region",
    ),
    "highest_education": ("No Formal quals", "Lower Than A Level", "A Level or Equivalent", "HE Qualification", "Post Graduate Qualification"),
    "imd_band": ("0-10%", "10-20", "20-30%", "30-40%", "40-50%", "50-60%", "60-70%", "70-80%", "80-90%", "90-100%"),
    "age_band": ("0-35", "35-55", "55<="),
    "disability": ("N", "Y"),
}
NUMERIC = ("num_of_prev_attempts", "studied_credits", "date_registration", "assessments_before_cutoff")
NUM_SKILLS = len(MODULES) * len(ASSESSMENT_TYPES)
PASS_MARK = 40.0


class OULAD(RealSource):
    name = "oulad"
    default_prefix = "oulad_"
    natural_modalities = ("tabular", "interactions")
    natural_tasks = ("final_result", "withdrawal")
    example_groups = ("GGG",)

    def __init__(self, folder: str = "oulad", by: str = "module", cutoff_day: int = 90, max_len: int = 16, unknown_values: str = "error", **options: Any):
        super().__init__(**options)
        if by not in ("module", "region"):
            raise ValueError(f"data source 'oulad': by must be 'module' or 'region', got {by!r}")
        if max_len < 1:
            raise ValueError(f"data source 'oulad': max_len must be >= 1, got {max_len}")
        self.folder, self.by, self.cutoff_day, self.max_len, self.unknown_values = folder, by, cutoff_day, max_len, unknown_values

    n_numeric = len(NUMERIC)
    cardinalities = [len(v) for v in CATEGORICAL.values()]
    num_skills = NUM_SKILLS

    def read(self, root: Path | None) -> Pool:
        folder = self.data_dir(root, self.folder)
        report: dict[str, Any] = {}
        # assessments.csv: id -> (module, type), the skill id.
        skill_of: dict[str, tuple[int, str]] = {}  # id -> (skill, module presentation)
        t = Table(folder / "assessments.csv", ["code_module", "code_presentation", "id_assessment", "assessment_type"])
        for row, cells in t:
            module = t.category(cells, row, "code_module", MODULES)
            kind = t.category(cells, row, "assessment_type", ASSESSMENT_TYPES)
            presentation = cells[t.col["code_module"]] + cells[t.col["code_presentation"]]
            skill_of[cells[t.col["id_assessment"]].strip()] = (module * len(ASSESSMENT_TYPES) + kind, presentation)
            count(report, t.path.name, "rows_read")
        # studentAssessment.csv (173k rows): keep submissions on or before the cutoff.
        # A registration is (student, module presentation): a student may repeat a module.
        logs: dict[tuple[str, str], list[tuple[float, int, int]]] = defaultdict(list)
        t = Table(folder / "studentAssessment.csv", ["id_assessment", "id_student", "date_submitted", "score"])
        c_a, c_s, c_d, c_sc = (t.col[c] for c in ("id_assessment", "id_student", "date_submitted", "score"))
        n_read = n_missing = n_late = 0
        for row, cells in t:
            n_read += 1
            skill, presentation = skill_of.get(cells[c_a], (None, ""))
            if skill is None:
                raise DataFileError(t.path, f"id_assessment {cells[c_a]!r} is not in assessments.csv", row, "id_assessment")
            try:
                day = float(cells[c_d])
            except ValueError:
                day = t.number(cells, row, "date_submitted")  # raises with file/row/column
            if day > self.cutoff_day:
                n_late += 1
                continue
            if cells[c_sc] == "":
                n_missing += 1
                continue
            score = t.number(cells, row, "score", 0, 100)
            logs[(cells[c_s], presentation)].append((day, skill, int(score >= PASS_MARK)))
        report[t.path.name] = {"rows_read": n_read, "after_cutoff (not used)": n_late, "dropped: score missing": n_missing}
        # studentRegistration.csv: date_registration only (date_unregistration leaks withdrawal).
        registered: dict[tuple[str, str, str], float] = {}
        t = Table(folder / "studentRegistration.csv", ["code_module", "code_presentation", "id_student", "date_registration"])
        for row, cells in t:
            key = (cells[t.col["code_module"]], cells[t.col["code_presentation"]], cells[t.col["id_student"]])
            text = cells[t.col["date_registration"]].strip()
            registered[key] = float("nan") if text == "" else t.number(cells, row, "date_registration")
            count(report, t.path.name, "rows_read")
            if text == "":
                count(report, t.path.name, "date_registration blank -> NaN")
        # studentInfo.csv: one sample per row.
        t = Table(folder / "studentInfo.csv", ["code_module", "code_presentation", "id_student", *[c for c in CATEGORICAL if c != "presentation"], "num_of_prev_attempts", "studied_credits", "final_result"], unknown=self.unknown_values)
        numeric, categorical, results, groups = [], [], [], []
        skills, correct, lengths = [], [], []
        for row, cells in t:
            module, pres, student = (cells[t.col[c]] for c in ("code_module", "code_presentation", "id_student"))
            cats = [t.category(cells, row, c, v, missing=("",) if c == "imd_band" else ()) for c, v in CATEGORICAL.items() if c != "presentation"]
            if pres[-1:] not in ("B", "J"):
                raise DataFileError(t.path, f"code_presentation {pres!r} does not end in B or J", row, "code_presentation")
            cats.insert(1, "BJ".index(pres[-1]))
            log = sorted(logs.get((student, module + pres), []))[-self.max_len :]
            numeric.append([
                t.number(cells, row, "num_of_prev_attempts", 0) / 6,
                t.number(cells, row, "studied_credits", 0) / 600,
                registered.get((module, pres, student), float("nan")) / 100,
                len(log) / 10,
            ])
            categorical.append(cats)
            results.append(t.category(cells, row, "final_result", RESULTS))
            groups.append(module if self.by == "module" else cells[t.col["region"]].replace(" ", "_"))
            skills.append([s for _, s, _ in log])
            correct.append([c for _, _, c in log])
            lengths.append(len(log))
            count(report, t.path.name, "rows_read")
        record_fixes(report, t)
        n = len(results)
        if n == 0:
            raise DataFileError(t.path, "has no data rows")
        width = max(1, max(lengths))
        skill_t = torch.zeros(n, width, dtype=torch.long)
        correct_t = torch.zeros(n, width, dtype=torch.long)
        for i, (s, c) in enumerate(zip(skills, correct)):
            skill_t[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            correct_t[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        length_t = torch.tensor(lengths)
        mask = torch.arange(width)[None, :] < length_t[:, None]
        result = torch.tensor(results)
        report["students_without_assessment_before_cutoff"] = int((length_t == 0).sum())
        return Pool(
            inputs={
                "tabular": {"numeric": torch.tensor(numeric, dtype=torch.float32), "categorical": torch.tensor(categorical)},
                "interactions": {"skill": skill_t, "correct": correct_t, "mask": mask},
            },
            targets={"final_result": result, "withdrawal": (result == 0).long()},
            groups=groups,
            present={"interactions": length_t > 0},
            report=report,
        )
