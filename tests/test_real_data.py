"""The real-data sources on the published files in ../shared/data (never skipped):
institution counts, sizes, shapes, ranges, reports, the UCI shared-student rule, errors
on corrupt copies, ``multi``, and a tiny federation proving the outputs fit the encoders."""

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import DATA, tiny_config_dict
from m3tfed import get_catalogue
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugins.data.common import DataFileError

UCI_CARDS = [2, 2, 2, 2, 2, 5, 5, 4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2]
OULAD_CARDS = [7, 2, 2, 13, 5, 10, 3, 2]
MODULES = ["AAA", "BBB", "CCC", "DDD", "EEE", "FFF", "GGG"]
CROHME = ["HAMEX", "KAIST", "MathBrush", "MfrDB", "expressmatch"]


def inst(name, modalities, tasks):
    return SimpleNamespace(name=name, modalities=modalities, tasks=tasks)


def load(plugin, names, inst_modalities, inst_tasks, seed=0, root=DATA, **options):
    source = get_catalogue().get("data", plugin).build(**options)
    return source.load([inst(n, inst_modalities, inst_tasks) for n in names], seed, root)


def both(d):
    return [d.train, d.val, d.test]


# -- UCI ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def uci():
    return load("uci_student", [f"uci_{g}" for g in ("GP_mat", "GP_por", "MS_mat", "MS_por")], ["tabular"], ["g3", "pass"])


def test_uci_institutions_shapes_and_ranges(uci):
    sizes = {k: v.report["rows_assigned"] for k, v in uci.items()}
    assert sizes == {"uci_GP_mat": 349, "uci_GP_por": 423, "uci_MS_mat": 46, "uci_MS_por": 226}
    for name, d in uci.items():
        assert d.report["train"] + d.report["val"] + d.report["test"] == sizes[name]
        for split in both(d):
            tab = split["tabular"]
            assert tab["numeric"].dtype == torch.float32 and tab["numeric"].shape[1] == 13
            assert 0 <= float(tab["numeric"].min()) and float(tab["numeric"].max()) <= 1
            cat = tab["categorical"]
            assert cat.dtype == torch.long and cat.shape[1] == len(UCI_CARDS)
            assert bool((cat < torch.tensor(UCI_CARDS)).all()) and bool((cat >= -1).all())
            g3, passed = split["targets"]["g3"], split["targets"]["pass"]
            assert -2 <= float(g3.min()) and float(g3.max()) <= 2
            assert torch.equal(passed, (g3 >= 0).long())
    read = uci["uci_GP_mat"].report["read"]
    assert read["student-mat.csv"]["rows_read"] == 395 and read["student-por.csv"]["rows_read"] == 649
    # The one corrupt cell of the published file is kept as missing and reported.
    assert read["student-por.csv"]["fixed_rows"] == {"famsize": [8]}
    assert sum(int((s["tabular"]["categorical"][:, 3] == -1).sum()) for s in both(uci["uci_GP_por"])) == 1


def _identity(split):
    """UCI's 13 merge attributes, read back from the encoded features."""
    num, cat = split["tabular"]["numeric"], split["tabular"]["categorical"]
    cols = torch.cat([num[:, :3], cat[:, [0, 1, 2, 3, 4, 5, 6, 7, 13, 15]].float()], dim=1)  # age Medu Fedu + categorical
    return {tuple(round(x, 4) for x in r) for r in cols.tolist()}


def test_uci_shared_students_never_straddle_two_splits(uci):
    assert uci["uci_GP_mat"].report["read"]["shared_students"] > 300
    train = set().union(*(_identity(d.train) for d in uci.values()))
    val = set().union(*(_identity(d.val) for d in uci.values()))
    test = set().union(*(_identity(d.test) for d in uci.values()))
    assert train & test == set() and train & val == set() and val & test == set()
    assert len(val) > 50 and len(test) > 50
    # ...and shared students really are in both subjects of their school
    assert _identity(uci["uci_GP_mat"].train) & _identity(uci["uci_GP_por"].train)


def test_uci_prior_grades_setup_and_renames():
    d = load("uci_student", ["uci_MS_mat"], ["student_table"], ["grade"], prior_grades="G1G2", modalities={"tabular": "student_table"}, tasks={"g3": "grade"})
    assert d["uci_MS_mat"].train["student_table"]["numeric"].shape[1] == 15
    with pytest.raises(ValueError, match="asks for task \\['pass'\\]"):
        load("uci_student", ["uci_MS_mat"], ["tabular"], ["pass"], tasks={"pass": "passed"})
    with pytest.raises(ValueError, match="no natural group for institution 'uci_XX_mat'"):
        load("uci_student", ["uci_XX_mat"], ["tabular"], ["g3"])


def _uci_copy(tmp_path, edit):
    folder = tmp_path / "uci"
    shutil.copytree(DATA / "uci_student_performance", folder)
    path = folder / "student-mat.csv"
    path.chmod(0o644)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(edit(lines))
    return folder


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda ls: "".join(ls[:5]) + ";".join(ls[5].split(";")[:12]) + "\n", "student-mat.csv, row 6: has 12 fields, header has 33"),
        (lambda ls: "".join(ls[:3]) + ls[3].replace(";15;", ";abc;", 1) + "".join(ls[4:]), "student-mat.csv, row 4, column 'age': expected a number, got 'abc'"),
        (lambda ls: "".join(ls[:3]) + ls[3].replace(";15;", ";40;", 1) + "".join(ls[4:]), "row 4, column 'age': value 40 outside the documented range 15..22"),
        (lambda ls: ls[0].replace("G3", "G4") + "".join(ls[1:]), r"student-mat.csv, row 1: missing column\(s\) \['G3'\]"),
        (lambda ls: "".join(ls[:9]) + ls[9][:30] + '"unterminated', "student-mat.csv, row 10"),
    ],
)
def test_uci_corrupt_copies_name_file_row_column(tmp_path, edit, words):
    folder = _uci_copy(tmp_path, edit)
    with pytest.raises(DataFileError, match=words):
        load("uci_student", ["uci_GP_mat"], ["tabular"], ["g3"], root=None, folder=str(folder))


def test_uci_strict_mode_and_missing_folder(tmp_path):
    folder = _uci_copy(tmp_path, lambda ls: "".join(ls[:2]) + ls[2].replace('"GT3"', '"XL"', 1) + "".join(ls[3:]))
    with pytest.raises(DataFileError, match="row 3, column 'famsize': unknown value 'XL'"):
        load("uci_student", ["uci_GP_mat"], ["tabular"], ["g3"], folder=str(folder), unknown_values="error")
    with pytest.raises(DataFileError, match="folder not found"):
        load("uci_student", ["uci_GP_mat"], ["tabular"], ["g3"], root=tmp_path)


# -- OULAD -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def oulad():
    return load("oulad", [f"oulad_{m}" for m in MODULES], ["tabular", "interactions"], ["final_result", "withdrawal"], max_per_institution=200)


def test_oulad_modules_shapes_sequences_and_report(oulad):
    data = oulad
    assert list(data) == [f"oulad_{m}" for m in MODULES]
    assert data["oulad_AAA"].report["rows_assigned"] == 748 and data["oulad_BBB"].report["rows_assigned"] == 7909
    for d in data.values():
        assert (d.report["train"], d.report["val"], d.report["test"]) == (120, 40, 40)  # the cap, then 60/20/20
        for split in both(d):
            tab, seq = split["tabular"], split["interactions"]
            assert tab["numeric"].shape[1] == 4 and tab["categorical"].shape[1] == len(OULAD_CARDS)
            assert bool((tab["categorical"] < torch.tensor(OULAD_CARDS)).all())
            assert seq["skill"].shape == seq["correct"].shape == seq["mask"].shape and seq["skill"].shape[1] <= 16
            assert seq["mask"].dtype == torch.bool and 0 <= int(seq["skill"].min()) and int(seq["skill"].max()) < 21
            assert set(seq["correct"].unique().tolist()) <= {0, 1}
            assert torch.equal(split["present"]["interactions"], seq["mask"].any(1))
            fr, wd = split["targets"]["final_result"], split["targets"]["withdrawal"]
            assert set(fr.unique().tolist()) <= {0, 1, 2, 3} and torch.equal(wd, (fr == 0).long())
    read = data["oulad_AAA"].report["read"]
    assert read["studentAssessment.csv"]["rows_read"] == 173_912 and read["studentInfo.csv"]["rows_read"] == 32_593
    assert read["studentAssessment.csv"]["dropped: score missing"] > 0  # counted, not silent
    assert read["studentRegistration.csv"]["date_registration blank -> NaN"] == 45
    # Skills are (module, type): each module only uses its own three skill ids.
    for i, m in enumerate(MODULES):
        seq = data[f"oulad_{m}"].train["interactions"]
        used = seq["skill"][seq["mask"]]
        assert used.numel() and bool(((used // 3) == i).all())


def test_oulad_cutoff_limits_the_sequence_and_region_split(oulad, monkeypatch):
    from m3tfed.plugins.data.oulad import OULAD

    reads = []
    read = OULAD.read
    monkeypatch.setattr(OULAD, "read", lambda self, root: reads.append(root) or read(self, root))
    again = load("oulad", ["oulad_GGG"], ["interactions"], ["withdrawal"], max_per_institution=200)["oulad_GGG"]
    assert reads == []  # parsed once per process (the baselines reload): no clock involved
    assert torch.equal(again.test["interactions"]["skill"], oulad["oulad_GGG"].test["interactions"]["skill"])
    short = load("oulad", ["oulad_GGG"], ["interactions"], ["withdrawal"], cutoff_day=30, max_per_institution=200)["oulad_GGG"]
    assert short.train["interactions"]["mask"].sum() < again.train["interactions"]["mask"].sum()
    regions = load("oulad", ["oulad_Scotland", "oulad_Wales"], ["tabular"], ["final_result"], by="region")
    assert regions["oulad_Scotland"].report["rows_assigned"] == 3446 and regions["oulad_Wales"].report["rows_assigned"] == 2086


# -- ELLIPSE -----------------------------------------------------------------------------
def test_ellipse_grades_text_and_scores():
    data = load("ellipse", ["ellipse_grade8", "ellipse_grade11", "ellipse_grade12", "ellipse_g9_10"], ["text"], ["essay_scores"],
                institutions={"ellipse_grade8": "grade8", "ellipse_grade11": "grade11", "ellipse_grade12": "grade12", "ellipse_g9_10": ["grade9", "grade10"]})
    sizes = {k: v.report["rows_assigned"] for k, v in data.items()}
    assert sizes == {"ellipse_grade8": 652, "ellipse_grade11": 903, "ellipse_grade12": 894, "ellipse_g9_10": 122}
    for d in data.values():
        for split in both(d):
            assert isinstance(split["text"], list) and all(isinstance(t, str) and len(t) > 50 for t in split["text"])
            y = split["targets"]["essay_scores"]
            assert y.shape[1] == 7 and y.dtype == torch.float32 and -1 <= float(y.min()) and float(y.max()) <= 1
            # scores come in 0.5 steps: (s - 3) / 2 is a multiple of 0.25
            assert torch.allclose(y * 4, (y * 4).round())
    assert data["ellipse_grade8"].report["read"]["ELLIPSE_Final_github_test.csv"]["rows_read"] == 2571
    prompts = load("ellipse", [f"ellipse_prompts{i}" for i in range(4)], ["text"], ["essay_scores"], by="prompt")
    counts = [v.report["rows_assigned"] for v in prompts.values()]
    assert sum(counts) == 2571 and max(counts) - min(counts) < 20


def test_ellipse_bad_score_names_row_and_column(tmp_path):
    import csv

    src = DATA / "ellipse" / "ELLIPSE_Final_github_test.csv"
    with open(src, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    rows[3][rows[0].index("Syntax")] = "7.5"
    rows[5][rows[0].index("Grammar")] = ""
    out = tmp_path / "ellipse"
    out.mkdir()
    with open(out / "ELLIPSE_Final_github_test.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[:10])
    with pytest.raises(DataFileError, match=r"column 'Syntax': value 7.5 outside"):
        load("ellipse", ["ellipse_grade11"], ["text"], ["essay_scores"], root=tmp_path)
    rows[3][rows[0].index("Syntax")] = "3.5"
    with open(out / "ELLIPSE_Final_github_test.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[:40])
    d = Path(tmp_path)
    report = load("ellipse", ["ellipse_grade11"], ["text"], ["essay_scores"], root=d)["ellipse_grade11"].report
    assert report["read"]["ELLIPSE_Final_github_test.csv"] == {"rows_read": 39, "dropped: score missing": 1}


# -- CROHME ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def crohme():
    return load("crohme", [f"crohme_{c}" for c in CROHME], ["image"], ["symbols"])


def test_crohme_images_and_symbol_labels(crohme):
    assert list(crohme) == [f"crohme_{c}" for c in CROHME]
    for d in crohme.values():
        assert d.report["rows_assigned"] == 200 and (d.report["train"], d.report["val"], d.report["test"]) == (120, 40, 40)
        for split in both(d):
            x, y = split["image"], split["targets"]["symbols"]
            assert x.shape[1:] == (1, 32, 96) and x.dtype == torch.float32
            assert float(x.min()) >= 0 and float(x.max()) <= 1 and 0.005 < float(x.mean()) < 0.3  # ink on blank paper
            assert y.shape[1] == 16 and set(y.unique().tolist()) <= {0.0, 1.0}
    read = crohme["crohme_KAIST"].report["read"]
    assert read["labels.csv"]["rows_read"] == 1000 and len(read["symbols"]) == 16
    assert {"=", "+", "x", "\\frac"} <= set(read["symbols"]) and "{" not in read["symbols"] and "\\mbox" not in read["symbols"]


def test_crohme_latex_symbols_and_broken_png(tmp_path):
    from m3tfed.plugins.data.crohme import latex_symbols

    assert latex_symbols("{ \\mbox { B } } ^ { 2 } \\lt \\frac {\\sqrt x} 2") == ["B", "2", "<", "\\frac", "\\sqrt", "x", "2"]
    folder = tmp_path / "crohme"
    shutil.copytree(DATA / "crohme_by_institution", folder)
    lines = (folder / "labels.csv").read_text().splitlines(keepends=True)
    (folder / "labels.csv").chmod(0o644)
    (folder / "labels.csv").write_text("".join(lines[:6]))
    bad = folder / lines[3].split(",")[4]
    bad.chmod(0o644)
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    with pytest.raises(DataFileError, match=rf"{bad.name}: cannot read PNG \(listed in labels.csv row 4\)"):
        load("crohme", ["crohme_MathBrush"], ["image"], ["symbols"], root=tmp_path, folder="crohme")


# -- multi and a real federation ---------------------------------------------------------
ALL_FOUR = {
    "uci": {"plugin": "uci_student", "options": {}},
    "oulad": {"plugin": "oulad", "options": {"modalities": {"tabular": "oulad_tabular"}, "max_per_institution": 40}},
    "essays": {"plugin": "ellipse", "options": {"institutions": {"ellipse_grade8": "grade8", "ellipse_grade11": "grade11"}, "max_per_institution": 40}},
    "crohme": {"plugin": "crohme", "options": {"max_per_institution": 40}},
}


def test_multi_routes_institutions_and_rejects_unserved():
    multi = get_catalogue().get("data", "multi").build(sources=ALL_FOUR)
    assert [multi.source_of(n) for n in ("uci_MS_mat", "oulad_AAA", "ellipse_grade8", "crohme_KAIST")] == ["uci", "oulad", "essays", "crohme"]
    with pytest.raises(ValueError, match="no source serves institution 'mystery'"):
        multi.source_of("mystery")
    with pytest.raises(ValueError, match="no source serves institution 'ellipse_grade12'"):
        multi.load([inst("ellipse_grade12", ["text"], ["essay_scores"])], 0, DATA)
    with pytest.raises(ValueError, match="sources.bad"):
        get_catalogue().get("data", "multi").build(sources={"bad": {"plugin": "oulad", "options": {"by": "planet"}}})


def test_tiny_federation_on_all_four_real_sources():
    d = tiny_config_dict(rounds=1, local_steps=1, batch_size=8, min_institutions=1)
    d["model"].update(
        d_model=16, n_layers=1, n_heads=2,
        encoders={
            "tabular": {"plugin": "tabular", "options": {"n_numeric": 13, "cardinalities": UCI_CARDS}},
            "oulad_tabular": {"plugin": "tabular", "options": {"n_numeric": 4, "cardinalities": OULAD_CARDS}},
            "interactions": {"plugin": "sequence", "options": {"num_skills": 21, "max_len": 16}},
            "text": {"plugin": "text", "options": {"max_length": 128, "max_tokens": 4}},
            "image": {"plugin": "image", "options": {"image_size": 96, "patch_size": 16, "channels": 1}},
        },
        experts=[{"name": "general", "plugin": "lowrank", "options": {"rank": 4}}],
        tasks={
            "g3": {"plugin": "regression"},
            "pass": {"plugin": "classification", "options": {"num_classes": 2}},
            "final_result": {"plugin": "classification", "options": {"num_classes": 4}},
            "withdrawal": {"plugin": "classification", "options": {"num_classes": 2}},
            "essay_scores": {"plugin": "multi_regression", "options": {"n_outputs": 7}},
            "symbols": {"plugin": "multi_label", "options": {"num_labels": 16}},
        },
    )
    d["data"] = {"plugin": "multi", "options": {"sources": ALL_FOUR}}
    d["institutions"] = [
        {"name": "uci_MS_mat", "modalities": ["tabular"], "tasks": ["g3", "pass"]},
        {"name": "oulad_GGG", "modalities": ["oulad_tabular", "interactions"], "tasks": ["final_result", "withdrawal"]},
        {"name": "ellipse_grade8", "modalities": ["text"], "tasks": ["essay_scores"]},
        {"name": "crohme_KAIST", "modalities": ["image"], "tasks": ["symbols"]},
    ]
    fed = build_federation(load_config(d), data_root=DATA)
    before = {k: v.clone() for k, v in fed.server.state["encoder.image"].items()}
    report = fed.server.run_round(0)
    assert sorted(report.succeeded) == sorted(fed.institutions), report.dropped
    assert report.contributors["encoder.image"] == ["crohme_KAIST"] and math.isfinite(report.loss)
    assert any(not torch.equal(before[k], v) for k, v in fed.server.state["encoder.image"].items())
    for name, institution in fed.institutions.items():
        model = institution.load(fed.server.state)
        metrics, _ = institution.evaluate(model)
        assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics.values()), (name, metrics)


def test_real_edu_example_runs_every_method_end_to_end(tmp_path):
    """examples/real-edu.toml as shipped (MiniLM included), shrunk to one short round:
    the federation, its baselines and the per-institution report all run on the real files."""
    from m3tfed.config import load_toml
    from m3tfed.federation.lifecycle import run_job

    d = load_toml(Path(__file__).resolve().parents[1] / "examples" / "real-edu.toml")
    assert len(d["institutions"]) >= 12 and len(d["model"]["tasks"]) >= 5 and len(d["model"]["encoders"]) >= 4
    d["rounds"] = 1
    d["federation"].update(local_steps=1, batch_size=8, personalize_steps=1)
    d["evaluation"]["plots"] = False
    assert d["evaluation"].pop("grid")["lr"]  # it ships a tuning grid; tuning is run_seeds' (test_tuning.py)
    d["model"]["encoders"]["text"]["options"]["max_length"] = 32
    for key, cap in {"oulad": 30, "ellipse": 12, "crohme": 20}.items():
        d["data"]["options"]["sources"][key]["options"]["max_per_institution"] = cap
    out = run_job(d, name="real", runs_dir=tmp_path, data_root=DATA, progress=lambda m: None)
    assert set(out["results"]) == {"fed_moe", "personalized", "local", "dense_fedavg", "centralized"}
    assert set(out["summary"]) == set(d["model"]["tasks"])
    assert set(out["comparison"]) == {"personalized", "local", "dense_fedavg", "centralized"}
    for s in out["summary"].values():
        for row in s["institutions"].values():
            assert all(math.isfinite(v) for v in row.values()), row
    assert all(math.isfinite(c["mean_relative_advantage"]) for c in out["comparison"].values())
    report = json.loads((tmp_path / "real" / "data_report.json").read_text())
    grade8 = report["ellipse_grade8"]
    assert grade8["train"] + grade8["val"] + grade8["test"] == 12 and grade8["rows_assigned"] == 652  # capped after assignment
    assert report["uci_MS_mat"]["rows_assigned"] == 46
