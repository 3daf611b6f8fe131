"""The evaluation protocol's splits: train / validation / test per institution, by unit,
deterministic by seed; choices on validation; test read once per method at the end."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.data import TEST, TRAIN, VAL, num_samples, split_sides, split_tree
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.federation.evaluation import FinalTest, RepeatedTestRead
from m3tfed.federation.lifecycle import run_job
from m3tfed.plugins.data.common import Pool, RealSource


def test_split_sides_keeps_every_unit_on_one_side_and_is_deterministic():
    units = torch.arange(300) // 3  # 100 students, three rows each
    a = split_sides(units, 0.2, 0.2, torch.Generator().manual_seed(1))
    b = split_sides(units, 0.2, 0.2, torch.Generator().manual_seed(1))
    c = split_sides(units, 0.2, 0.2, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for u in range(100):
        assert len(set(a[units == u].tolist())) == 1  # a student's rows never straddle splits
    per_unit = a[::3]
    assert [int((per_unit == s).sum()) for s in (TRAIN, VAL, TEST)] == [60, 20, 20]


def test_split_sides_rejects_fractions_that_leave_no_training_data():
    with pytest.raises(ValueError, match="sum to less than 1"):
        split_sides(10, 0.5, 0.5, torch.Generator())


def test_split_tree_cuts_every_leaf_alike():
    tree = {"x": torch.arange(50).float(), "text": [str(i) for i in range(50)], "present": {}, "targets": {"y": torch.arange(50)}}
    train, val, test = split_tree(tree, 0.2, 0.2, torch.Generator().manual_seed(0))
    assert (num_samples(train), num_samples(val), num_samples(test)) == (30, 10, 10)
    seen = torch.cat([s["targets"]["y"] for s in (train, val, test)])
    assert sorted(seen.tolist()) == list(range(50))
    for s in (train, val, test):
        assert s["x"].long().tolist() == s["targets"]["y"].tolist() and s["text"] == [str(int(i)) for i in s["targets"]["y"]]


class TwoSchools(RealSource):
    """A file-less real source: 40 students, each with a row in both schools."""

    name = "two_schools"
    natural_modalities = ("tabular",)
    natural_tasks = ("score",)

    def read(self, root):
        student = torch.arange(40).repeat(2)
        return Pool(
            inputs={"tabular": student.float().unsqueeze(1)},
            targets={"score": student.float()},
            groups=["a"] * 40 + ["b"] * 40,
            units=student,
        )


def test_a_real_source_splits_by_unit_across_institutions():
    insts = [SimpleNamespace(name=n, modalities=["tabular"], tasks=["score"]) for n in ("a", "b")]
    data = TwoSchools().load(insts, seed=3)
    sides = {}
    for d in data.values():
        for split in ("train", "val", "test"):
            for student in getattr(d, split)["targets"]["score"].long().tolist():
                assert sides.setdefault(student, split) == split  # the same side in both schools
        assert d.report["train"] + d.report["val"] + d.report["test"] == 40 and d.report["val"] == 8
    again = TwoSchools().load(insts, seed=3)
    assert torch.equal(again["a"].val["targets"]["score"], data["a"].val["targets"]["score"])


def test_synthetic_source_yields_three_disjoint_splits():
    fed = build_federation(load_config(tiny_config_dict(n=40)))
    for inst in fed.institutions.values():
        d = inst.data
        assert (num_samples(d.train), num_samples(d.val), num_samples(d.test)) == (24, 8, 8)
        assert d.report["val"] == 8


def test_test_split_is_read_only_through_final_test():
    fed = build_federation(load_config(tiny_config_dict()))
    inst = fed.institutions["high_school"]
    model = inst.load(fed.server.state)
    with pytest.raises(ValueError, match="test split is read once"):
        inst.evaluate(model, "test")
    final = FinalTest()
    metrics, _ = final.evaluate("fed_moe", inst, model)
    assert set(metrics) == set(inst.config.tasks)
    with pytest.raises(RepeatedTestRead, match="'fed_moe' already read the test split of 'high_school'"):
        final.evaluate("fed_moe", inst, model)
    final.evaluate("local", inst, model)  # another method reads it once too
    assert final.reads == {"fed_moe": {"high_school": 1}, "local": {"high_school": 1}}


def test_a_run_reads_test_once_per_method_and_keeps_the_best_validation_round(tmp_path):
    cfg = tiny_config_dict(rounds=3)
    cfg["institutions"] = cfg["institutions"][:3]  # three of six: every method, half the time
    cfg["evaluation"] = {"baselines": ["local", "dense_fedavg", "centralized"], "personalize": True, "plots": False}
    out = run_job(cfg, name="p", runs_dir=tmp_path, progress=lambda m: None)
    names = {i["name"] for i in cfg["institutions"]}
    assert out["test_reads"] == {m: dict.fromkeys(names, 1) for m in ("fed_moe", "personalized", "local", "dense_fedavg", "centralized")}
    curves = json.loads((tmp_path / "p" / "curves.json").read_text())
    assert [c["round"] for c in curves] == [1, 2, 3]
    # evaluation.keep = "group" (the default): no two of these share tasks and modalities,
    # so every institution keeps its own best round
    own = {n: min(curves, key=lambda c: sum(m["loss"] for m in c["metrics"][n].values()))["round"] for n in names}
    assert out["kept_round"] == own
    # the curves are validation metrics: the same numbers a fresh validation pass gives
    assert all(set(c["metrics"]) == names for c in curves)


def test_each_institution_is_tested_with_the_round_of_its_own_lowest_validation_loss(tmp_path):
    cfg = tiny_config_dict(rounds=3)
    cfg["institutions"] = cfg["institutions"][:3]
    cfg["evaluation"] = {"baselines": [], "personalize": False, "plots": False}
    out = run_job(cfg, name="each", runs_dir=tmp_path, progress=lambda m: None)
    kept = out["kept_round"]
    # the same run stopped at an institution's kept round tests that institution alike
    for rnd in sorted(set(kept.values())):
        again = run_job({**cfg, "rounds": rnd, "evaluation": {**cfg["evaluation"], "keep": "last"}}, name=f"last{rnd}", runs_dir=tmp_path, progress=lambda m: None)
        assert again["kept_round"] == rnd
        for name in (n for n, r in kept.items() if r == rnd):
            assert again["results"]["fed_moe"][name] == out["results"]["fed_moe"][name]
    # keep = "best": one round for all, the lowest mean validation loss
    best = run_job({**cfg, "evaluation": {**cfg["evaluation"], "keep": "best"}}, name="best", runs_dir=tmp_path, progress=lambda m: None)
    curves = json.loads((tmp_path / "best" / "curves.json").read_text())
    assert best["kept_round"] == min(curves, key=lambda c: c["val_loss"])["round"]


def test_validation_every_k_rounds_and_on_a_sample_cap(tmp_path):
    cfg = tiny_config_dict(rounds=5)
    cfg["evaluation"].update(every=2, val_samples=3)
    run_job(cfg, name="k", runs_dir=tmp_path, progress=lambda m: None)
    curves = json.loads((tmp_path / "k" / "curves.json").read_text())
    assert [c["round"] for c in curves if "metrics" in c] == [2, 4, 5]  # every 2nd and the last
    assert all("loss" in c for c in curves)
    with pytest.raises(Exception, match="evaluation.every"):
        load_config({**tiny_config_dict(), "evaluation": {"every": 0}})
