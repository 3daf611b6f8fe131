"""Forgetting an institution: what it touched is rolled back and retrained without it."""

import json
import shutil

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed import CheckpointError, ConfigError
from m3tfed.cli import main
from m3tfed.config import to_dict
from m3tfed.federation.build import build_federation
from m3tfed.federation.checkpoint import (
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    personal_path,
    write_json_atomic,
)
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import resume_job, run_job
from m3tfed.federation.server import AVERAGED_PREFIX
from m3tfed.federation.unlearning import forget


def quiet(msg):
    pass


def final(run_dir):
    tensors, meta = load_checkpoint(latest_checkpoint(run_dir))
    return tensors, meta


def by_component(tensors):
    out = {}
    for key, t in tensors.items():
        comp, _, param = key.partition("::")
        out.setdefault(comp, {})[param] = t
    return out


@pytest.fixture(scope="module")
def six(tmp_path_factory):
    """The tiny default federation (6 institutions, 2 rounds), run to the end."""
    runs = tmp_path_factory.mktemp("runs")
    d = tiny_config_dict(rounds=2)
    run_job(d, name="orig", runs_dir=runs, progress=quiet)
    return runs / "orig"


def test_forget_rolls_back_and_retrains_only_what_the_institution_touched(six, capsys):
    assert main(["forget", str(six), "--institution", "rural_school"]) == 0
    out = six.with_name("orig-without-rural_school")
    assert str(out) in capsys.readouterr().out
    rec = json.loads((out / "forgotten.json").read_text())
    assert (
        rec["institution"] == "rural_school"
        and rec["forget_on_request"] is False
        and rec["scope"] == "touched"
    )
    assert (
        rec["first_contribution_round"] == 1
        and rec["rolled_back_to_round"] == 0
        and rec["retrained_rounds"] == [1, 2]
    )
    # rural_school has only tabular data and the grade task: the image encoder and the
    # vision experts were never its business
    assert {"encoder.tabular", "task.grade", "router", "trunk"} <= set(rec["rolled_back"])
    assert {"encoder.image", "expert.vision_0", "task.symbol", "task.dropout"} <= set(rec["kept"])

    before, original = final(six)
    after, meta = final(out)
    before, after = by_component(before), by_component(after)
    assert {"encoder.image", "expert.vision_0", "task.dropout"} <= {
        c for _, _, c in original["contributions"]
    }
    for comp in rec["kept"]:  # trained by others, and bit-identical to the original run
        assert all(torch.equal(after[comp][k], v) for k, v in before[comp].items()), comp
    for comp in rec["rolled_back"]:  # retrained without it: different from the original
        assert any(not torch.equal(after[comp][k], v) for k, v in before[comp].items()), comp
    # the record of who touched what no longer names it, and the retrained rounds are there
    assert meta["round"] == 2 and all(
        name != "rural_school" for _, name, _ in meta["contributions"]
    )
    assert {(r, c) for r, _, c in meta["contributions"] if c == "encoder.tabular"} == {
        (1, "encoder.tabular"),
        (2, "encoder.tabular"),
    }
    assert [i["name"] for i in json.loads((out / "config.json").read_text())["institutions"]] == [
        "high_school",
        "university",
        "online_tutor",
        "community_college",
        "math_academy",
    ]
    assert "rural_school" not in json.loads((out / "metrics.json").read_text())["selections"]


def three_institution_run(tmp_path, rounds=3, policy=None, personal_model="none"):
    """community_college trains a superset of what the two others train, and is offline
    in round 1, so its first contribution is in round 2."""
    d = tiny_config_dict(rounds=rounds)
    # Persisted optimizer moments and personal models, like personal parts, restart at the
    # rollback round (only the newest are kept), so "touched" is compared where there are none.
    d["federation"]["optimizer_state"] = "fresh"
    d["federation"]["personal_model"] = personal_model
    cc = {
        "name": "community_college",
        "modalities": ["tabular", "interactions", "text"],
        "tasks": ["grade", "dropout", "essay_score"],
        "experts": ["general_0", "text_0", "logs_0"],
    }
    if policy is not None:
        cc["policy"] = policy
    d["institutions"] = [
        {
            "name": "high_school",
            "modalities": ["tabular", "text"],
            "tasks": ["grade", "essay_score"],
            "experts": ["general_0", "text_0"],
        },
        {
            "name": "university",
            "modalities": ["tabular", "interactions"],
            "tasks": ["grade", "dropout"],
            "experts": ["general_0", "logs_0"],
        },
        cc,
    ]
    run = tmp_path / "orig"
    run.mkdir()
    write_json_atomic(run / "config.json", to_dict(load_config(d)))
    fed = build_federation(load_config(d), run_dir=run)
    inst = fed.institutions["community_college"]
    train = inst.train

    def offline_in_round_1(job):
        if job.round == 1:
            raise RuntimeError("offline")
        return train(job)

    inst.train = offline_in_round_1
    for rnd in range(1, rounds + 1):
        fed.server.run_round(rnd)
    assert "community_college" in fed.server.history[0].dropped
    d["institutions"] = d["institutions"][:2]
    return run, d


def test_forgetting_equals_a_run_without_the_institution(tmp_path):
    run, without = three_institution_run(tmp_path)
    exact = forget(run, "community_college", out_dir=tmp_path / "all", scope="all", progress=quiet)
    touched = forget(run, "community_college", out_dir=tmp_path / "touched", progress=quiet)
    # the federation as if community_college had never joined
    fresh = build_federation(load_config(without))
    for rnd in (1, 2, 3):
        fresh.server.run_round(rnd)
    others = {c for r in fresh.server.history for c in r.contributors}
    assert others <= set(touched["rolled_back"])  # it touched all the others train
    assert (
        exact["first_contribution_round"] == 2
        and exact["rolled_back_to_round"] == 0
        and exact["retrained_rounds"] == [1, 2, 3]
    )
    assert (
        touched["first_contribution_round"] == 2
        and touched["rolled_back_to_round"] == 1
        and touched["retrained_rounds"] == [2, 3]
    )
    for rec in (exact, touched):
        tensors, meta = final(rec["run_dir"])
        state = by_component(tensors)
        for comp, params in fresh.server.state.items():
            for k, v in params.items():
                assert torch.equal(state[comp][k], v), (rec["scope"], comp, k)
        # and the state averaged over rounds: as if it had never joined too
        assert fresh.server.averaged and all(
            torch.equal(tensors[f"{AVERAGED_PREFIX}{comp}::{k}"], v) for comp, params in fresh.server.averaged.items() for k, v in params.items()
        ), rec["scope"]
        assert [tuple(c) for c in meta["contributions"]] == fresh.server.contributions
    # round 1 (before it contributed) is carried over, without its name
    m1 = load_checkpoint(checkpoint_path(tmp_path / "touched", 1))[1]
    assert [i["name"] for i in m1["config"]["institutions"]] == ["high_school", "university"]
    assert (
        m1["history"][0]["dropped"] == {} and "community_college" not in m1["history"][0]["sampled"]
    )


def test_forget_refuses_with_the_reason(tmp_path):
    run, _ = three_institution_run(tmp_path, rounds=2)
    with pytest.raises(
        ConfigError,
        match="no institution named 'nowhere'.*high_school, university, community_college",
    ):
        forget(run, "nowhere", progress=quiet)
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match="taken already exists"):
        forget(run, "community_college", out_dir=tmp_path / "taken", progress=quiet)
    cfg = json.loads((run / "config.json").read_text())
    cfg["federation"]["min_institutions"] = 3
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ConfigError, match="forgetting 'university' leaves 2 institutions, fewer than the 3"
    ):
        forget(run, "university", progress=quiet)
    cfg["federation"]["min_institutions"] = 2
    (run / "config.json").write_text(json.dumps(cfg))
    shutil.rmtree(checkpoint_path(run, 1))
    with pytest.raises(CheckpointError, match=r"round\(s\) 1 of 1..2 are missing"):
        forget(run, "community_college", progress=quiet)
    assert not (tmp_path / "orig-without-community_college").exists()


def test_forget_on_request_is_enforced_not_recorded(tmp_path, capsys):
    # Hole: forget_on_request was only written into forgotten.json; the source run kept
    # every checkpoint carrying the institution's influence and could be resumed.
    run, _ = three_institution_run(tmp_path, rounds=2, policy={"forget_on_request": True})
    with pytest.raises(
        ConfigError, match=r"institutions\[2\]\.policy\.forget_on_request.*only scope 'all'"
    ):
        forget(run, "community_college", scope="touched", progress=quiet)
    assert (
        main(
            [
                "forget",
                str(run),
                "--institution",
                "community_college",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert "erased from" in capsys.readouterr().out
    rec = json.loads((tmp_path / "out" / "forgotten.json").read_text())
    assert rec["scope"] == "all" and rec["forget_on_request"] is True
    # its influence is gone from the source: rounds 2.. (it first contributed in 2) deleted
    assert rec["erased_from_source"] == [str(checkpoint_path(run, 2).relative_to(run))]
    assert not checkpoint_path(run, 2).exists() and checkpoint_path(run, 1).exists()
    assert (run / "erased.json").exists()
    with pytest.raises(CheckpointError, match="erased from this run on its request"):
        resume_job(run, progress=quiet)
    with pytest.raises(CheckpointError, match="already erased"):
        forget(run, "university", out_dir=tmp_path / "again", progress=quiet)


def test_forget_all_equals_a_run_that_never_had_it_with_sampling_and_personal_parts(tmp_path):
    # Hole: scope all restarted from the round before the first contribution, so rounds
    # sampled among institutions that included it, and personal parts restarted mid-run,
    # made the result differ from a run without it whenever fraction < 1 or parts are personal.
    d = tiny_config_dict(rounds=3, fraction=0.5, min_institutions=2)
    for inst in d["institutions"]:
        inst["personal"] = [f"task.{inst['tasks'][0]}"]
    run_job(d, name="orig", runs_dir=tmp_path, progress=quiet)
    _, meta = final(tmp_path / "orig")
    first = {}
    for r, n, _ in meta["contributions"]:
        first[n] = min(first.get(n, r), r)
    late = sorted(n for n, r in first.items() if r > 1)
    assert late, "the seed should leave some institution out of round 1"
    x = late[0]
    rec = forget(tmp_path / "orig", x, out_dir=tmp_path / "without", scope="all", progress=quiet)
    assert rec["rolled_back_to_round"] == 0
    fresh = {**d, "institutions": [i for i in d["institutions"] if i["name"] != x]}
    run_job(fresh, name="fresh", runs_dir=tmp_path, progress=quiet)
    a, b = by_component(final(tmp_path / "without")[0]), by_component(final(tmp_path / "fresh")[0])
    assert a.keys() == b.keys()
    for comp, params in b.items():
        assert all(torch.equal(a[comp][k], v) for k, v in params.items()), comp


def test_unlearning_bench_smoke_measures_forget_against_a_full_retrain(capsys):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "unlearning.py"
    spec = importlib.util.spec_from_file_location("unlearning_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    module.main(["--smoke"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    secs = result["seconds"]
    assert all(v > 0 for v in secs.values()) and result["retrained_rounds"]["all"] == result["rounds"]
    assert 1 <= result["retrained_rounds"]["touched"] <= result["rounds"] - result["first_contribution_round"] + 1
    assert set(result["speedup_vs_retrain"]) == {"touched", "all"}


@pytest.mark.parametrize("keep", ["group", "each", "best"])
def test_a_forgotten_run_keeps_the_best_of_its_retrained_rounds(tmp_path, monkeypatch, keep):
    # The copied curves (rounds before the institution's first contribution) keep their
    # metrics but their states are not in the new folder: they must not compete, or a
    # retrained round that beats the first retrained one but not an original round is
    # never kept (it happened under keep = "each" and "best").
    from m3tfed.federation import evaluation
    from m3tfed.federation.institution import Institution

    d = tiny_config_dict(rounds=4, n=16)
    d["institutions"] = d["institutions"][:3]
    d["evaluation"]["keep"] = keep
    victim = d["institutions"][2]["name"]
    train = Institution.train

    def offline_in_round_1(self, job):
        if self.name == victim and job.round == 1:
            raise RuntimeError("offline")
        return train(self, job)

    scores = {"original": {1: 0.5, 2: 0.6, 3: 0.6, 4: 0.6}, "forgotten": {2: 0.9, 3: 0.7, 4: 0.8}}
    phase = ["original"]

    def scripted(fed, shared, limit=None):  # the averaged state scores the same: never kept
        s = scores[phase[0]][fed.server.round]
        return {n: {t: {"loss": s} for t in i.config.tasks[:1]} for n, i in fed.institutions.items()}, {}

    monkeypatch.setattr(Institution, "train", offline_in_round_1)
    monkeypatch.setattr(evaluation, "validate", scripted)
    run_job(d, name="orig", runs_dir=tmp_path, progress=quiet, echo=False)
    phase[0] = "forgotten"
    rec = forget(tmp_path / "orig", victim, scope="touched", progress=quiet)
    assert rec["retrained_rounds"] == [2, 3, 4]
    kept = json.loads((tmp_path / rec["run_dir"] / "metrics.json").read_text())["kept_round"]
    assert kept == ({n: 3 for n in kept} if keep != "best" else 3) and kept


def test_erasure_on_request_removes_the_states_kept_for_testing(tmp_path):
    # kept/ holds the institution's personal parts and states it influenced
    d = tiny_config_dict(rounds=2, n=16)
    d["institutions"] = d["institutions"][:3]
    d["institutions"][2]["policy"] = {"forget_on_request": True}
    run_job(d, name="orig", runs_dir=tmp_path, progress=quiet, echo=False)
    assert (tmp_path / "orig" / "kept" / d["institutions"][2]["name"]).is_dir()
    rec = forget(tmp_path / "orig", d["institutions"][2]["name"], progress=quiet)
    assert "kept" in rec["erased_from_source"] and not (tmp_path / "orig" / "kept").exists()


def test_erasure_on_request_removes_the_others_personal_state_it_influenced(tmp_path):
    """From its first contribution on, the others' personal snapshots (here their Ditto
    personal models, pulled toward a shared model it influenced) go with the checkpoints."""
    run, _ = three_institution_run(tmp_path, rounds=3, policy={"forget_on_request": True}, personal_model="ditto")
    others = ("high_school", "university")
    assert all(personal_path(run, n, 3).exists() for n in others)  # each keeps its newest
    rec = forget(run, "community_college", out_dir=tmp_path / "out", progress=quiet)
    for n in others:
        assert not any((run / "institutions" / n).glob("round_*")), n
        assert str(personal_path(run, n, 3).relative_to(run)) in rec["erased_from_source"]


def test_a_forgotten_institution_leaves_no_name_in_the_copied_curves():
    from m3tfed.federation.unlearning import _curve_without

    entry = {"round": 1, "val_loss": 0.5, "metrics": {"a": {"t": {"loss": 1.0}}, "b": {"t": {"loss": 0.0}}}, "averaged": ["a", "b"]}
    out = _curve_without(entry, "a")
    assert out == {"round": 1, "metrics": {"b": {"t": {"loss": 0.0}}}, "averaged": ["b"]}
