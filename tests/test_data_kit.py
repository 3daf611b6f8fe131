"""The data-source kit as docs/data.md shows it: the "Write a data source" example, run
from the page itself, passes the author's check, splits by student, caps, and trains a
federation; the kit's helpers are public in ``m3tfed.data``."""

import re
import types
from pathlib import Path

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.data import TEST, TRAIN, VAL, cap_rows, split_sides, split_tree
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugin_manager import catalogue_from
from m3tfed.seeds import seed_for
from m3tfed.testing import check_data_source

DOC = Path(__file__).resolve().parents[1] / "docs" / "data.md"


@pytest.fixture(scope="module")
def my_quiz():
    """The example module, executed from the page."""
    code = re.search(r"```python\n(# my_quiz\.py.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("my_quiz")
    exec(compile(code, str(DOC), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def quiz_csv(tmp_path_factory):
    """Two schools, 20 students each, two courses per student (rows), whether the
    student passed depending on hours studied."""
    root = tmp_path_factory.mktemp("quiz")
    g = torch.Generator().manual_seed(0)
    lines = ["school,student,hours,gender,answers,passed"]
    for s, school in enumerate(("north", "south")):
        for student in range(20):
            for _course in range(2):
                hours = int(torch.randint(0, 40, (1,), generator=g))
                n = int(torch.randint(0, 12, (1,), generator=g))  # some rows have no answers
                answers = " ".join(
                    f"{int(torch.randint(0, 6, (1,), generator=g))}:{int(torch.rand(1, generator=g) < 0.6)}"
                    for _ in range(n)
                )
                lines.append(
                    f"{school},{100 * s + student},{hours},{student % 2},{answers},{int(hours > 20)}"
                )
    (root / "quiz.csv").write_text("\n".join(lines) + "\n")
    return root


def test_the_documented_source_passes_the_kit_and_splits_by_student(my_quiz, quiz_csv):
    data = check_data_source(my_quiz.SPEC, data_root=quiz_csv)
    assert sorted(data) == ["north", "south"]
    for d in data.values():
        assert d.report["rows_assigned"] == 40 and d.report["read"] == {
            "quiz.csv": {"rows_read": 40}
        }
        sizes = [d.report[k] for k in ("train", "val", "test")]
        assert sum(sizes) == 40 and min(sizes) >= 4  # by student: each side has whole students
        assert (
            d.train["interactions"]["skill"].shape[1:] == (8,)
            and d.train["interactions"]["mask"].dtype == torch.bool
        )
    # the same split drawn on the students' ids (the source's generator and units): no
    # student is on two sides, and the source's rows are those students' rows, in order
    rows = [
        line.split(",")
        for line in (quiz_csv / "quiz.csv").read_text().splitlines()[1:]
        if line.startswith("north,")
    ]
    students = torch.tensor([int(r[1]) for r in rows])
    g = torch.Generator().manual_seed(seed_for(0, "my_quiz", "north"))
    ids = split_tree(
        {"targets": {"id": students}, "row": torch.arange(40)}, 0.2, 0.2, g, units=students
    )
    train, val, test = ({int(i) for i in split["targets"]["id"]} for split in ids)
    assert train and val and test and not (train & val or train & test or val & test)
    passed = torch.tensor([int(r[5]) for r in rows])
    for split, drawn in zip((data["north"].train, data["north"].val, data["north"].test), ids):
        assert torch.equal(split["targets"]["passed"], passed[drawn["row"]])


def test_the_documented_source_caps_and_keeps_students_whole(my_quiz, quiz_csv):
    source = my_quiz.QuizSource(max_per_institution=24)
    inst = types.SimpleNamespace(name="south", modalities=["tabular"], tasks=["passed"])
    d = source.load([inst], 3, quiz_csv)["south"]
    assert (
        d.report["rows_dropped_by_cap"] == 16
        and d.report["train"] + d.report["val"] + d.report["test"] == 24
    )
    assert "interactions" not in d.train and set(d.train) == {
        "tabular",
        "targets",
    }  # only what it asked for


def test_cap_rows_and_split_sides_are_the_kits():
    g = torch.Generator().manual_seed(1)
    idx = torch.arange(10)
    assert cap_rows(idx, None, g) is idx and cap_rows(idx, 10, g) is idx
    capped = cap_rows(idx, 4, torch.Generator().manual_seed(1))
    assert len(capped) == 4 and torch.equal(capped, capped.sort().values)
    assert torch.equal(capped, cap_rows(idx, 4, torch.Generator().manual_seed(1)))  # by seed
    units = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    sides = split_sides(units, 0.2, 0.2, g)
    assert all(sides[2 * u] == sides[2 * u + 1] for u in range(5))  # a unit's rows together
    assert {int(s) for s in sides} == {TRAIN, VAL, TEST}


def test_a_federation_trains_on_the_documented_source(my_quiz, quiz_csv):
    d = tiny_config_dict(rounds=1)
    d["data"] = {"plugin": "my_quiz", "options": {}}
    d["model"]["encoders"] = {
        "tabular": {"plugin": "tabular", "options": {"n_numeric": 1, "cardinalities": [2]}},
        "interactions": {"plugin": "sequence", "options": {"num_skills": 6, "max_len": 8}},
    }
    d["model"]["tasks"] = {"passed": {"plugin": "classification", "options": {"num_classes": 2}}}
    d["model"]["experts"] = [
        e
        for e in d["model"]["experts"]
        if set(e.get("modalities", [])) <= {"tabular", "interactions"}
    ]
    d["institutions"] = [
        {"name": n, "modalities": ["tabular", "interactions"], "tasks": ["passed"]}
        for n in ("north", "south")
    ]
    fed = build_federation(load_config(d), catalogue=catalogue_from([my_quiz]), data_root=quiz_csv)
    report = fed.server.run_round(1)
    assert sorted(report.succeeded) == ["north", "south"] and torch.isfinite(
        torch.tensor(report.loss)
    )
