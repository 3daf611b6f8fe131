"""One commit point per round: a kill at any write step of a round's checkpoint leaves
the previous round or the next one, whole (server state and every institution's personal
state together); resume refuses a checkpoint from another config or another run, and
missing personal state."""

import json
import os
import shutil

import pytest
import safetensors.torch
import torch
from conftest import tiny_config_dict
from m3tfed.errors import CheckpointError
from m3tfed.federation import checkpoint
from m3tfed.federation.build import build_federation
from m3tfed.federation.checkpoint import load_checkpoint, round_checkpoints
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import resumable_config, resume_job, run_job

QUIET = {"progress": lambda m: None}


def small_config(rounds=2):
    d = tiny_config_dict(rounds=rounds, local_steps=1)
    keep = {"high_school", "university", "math_academy"}
    d["institutions"] = [i for i in d["institutions"] if i["name"] in keep]
    d["institutions"][0]["personal"] = ["router", "task.grade"]  # math_academy keeps task.symbol
    return d


def restore_latest(fed, run_dir):
    fed.server.run_dir = run_dir
    tensors, meta = load_checkpoint(round_checkpoints(run_dir)[0])
    fed.server.restore(tensors, meta)
    return fed


def snapshot(fed):
    personal = {
        n: {c: {k: v.clone() for k, v in s.items()} for c, s in i.personal_state.items()}
        for n, i in fed.institutions.items()
    }
    return (
        fed.server.round,
        {c: {k: v.clone() for k, v in s.items()} for c, s in fed.server.state.items()},
        personal,
    )


def same(a, b):
    return a.keys() == b.keys() and all(
        a[c].keys() == b[c].keys() and all(torch.equal(a[c][k], b[c][k]) for k in a[c]) for c in a
    )


class Killed(BaseException):
    """The process dies: nothing after it runs, not even cleanup handlers."""


def kill_at(monkeypatch, step):
    """Make the ``step``-th file-system write of the checkpoint code (0-based) and every
    one after it die, as if the process were killed there."""
    count = [0]

    def dying(fn):
        def wrapped(*args, **kwargs):
            if count[0] >= step:
                raise Killed(f"killed at write step {step}")
            count[0] += 1
            return fn(*args, **kwargs)

        return wrapped

    for owner, name in [
        (safetensors.torch, "save_file"),
        (checkpoint, "_write_synced"),
        (os, "replace"),
        (shutil, "rmtree"),
        (checkpoint.tempfile, "mkdtemp"),
    ]:
        monkeypatch.setattr(owner, name, dying(getattr(owner, name)))
    return count


def test_a_kill_at_every_write_step_leaves_one_whole_round(tmp_path, monkeypatch):
    base = tmp_path / "runs" / "base"
    run_job(small_config(), name="base", runs_dir=base.parent, stop_after=1, **QUIET)
    cfg = load_config(json.loads((base / "config.json").read_text()))
    fed, checker = restore_latest(build_federation(cfg), base), build_federation(cfg)
    before = snapshot(fed)
    assert (
        before[0] == 1 and before[2]["high_school"] and before[2]["math_academy"]
    )  # personal state is exercised
    fed.server.run_dir = None
    fed.server.run_round(2)  # round 2 trained and aggregated, in memory: only its commit is left
    after = snapshot(fed)

    outcomes = []
    for step in range(100):
        run_dir = tmp_path / f"kill{step}"
        shutil.copytree(base, run_dir)
        fed.server.run_dir = run_dir
        with monkeypatch.context() as m:
            count = kill_at(m, step)
            try:
                fed.server.checkpoint()
                finished = True
            except Killed:
                finished = False
        now = snapshot(restore_latest(checker, run_dir))  # what a resume after the kill sees
        whole = [
            r
            for r, ref in ((1, before), (2, after))
            if now[0] == r
            and same(now[1], ref[1])
            and all(same(now[2][n], ref[2][n]) for n in ref[2])
        ]
        assert whole, (
            f"a kill at write step {step} left round {now[0]} with state or personal state of neither round"
        )
        outcomes.append(now[0])
        if finished:
            break
    assert count[0] == step and finished and outcomes[-1] == 2
    assert (
        1 in outcomes and outcomes.index(2) > 4
    )  # several write steps before the commit point, and round 1 survives each


def test_resume_refuses_missing_personal_state(tmp_path):
    run_job(small_config(), name="r", runs_dir=tmp_path, stop_after=1, **QUIET)
    shutil.rmtree(tmp_path / "r" / "institutions" / "math_academy")
    with pytest.raises(
        CheckpointError,
        match="institution 'math_academy''s personal state for round 1 is missing.*task.symbol",
    ):
        resume_job(tmp_path / "r", **QUIET)
    shutil.rmtree(tmp_path / "r" / "institutions")
    with pytest.raises(CheckpointError, match="personal state for round 1 is missing"):
        resume_job(tmp_path / "r", **QUIET)


def test_resume_refuses_a_checkpoint_written_under_another_config(tmp_path):
    run_job(small_config(), name="r", runs_dir=tmp_path, stop_after=1, **QUIET)
    path = tmp_path / "r" / "config.json"
    config = json.loads(path.read_text())
    config["federation"]["lr"] = 0.5  # same shapes, different run
    path.write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match="written under a different config; differing keys: federation.lr"
    ):
        resume_job(tmp_path / "r", **QUIET)


def test_a_run_written_before_a_setting_existed_resumes(tmp_path):
    """A run whose config.json and checkpoint predate ``model.tasks.<t>.wide`` (added in
    December 2026) resumes: the missing setting reads as its default, which keeps the old
    behaviour. A setting the old run did set still has to match."""
    d = small_config()
    for task in d["model"]["tasks"].values():
        task["wide"] = []  # a run of that time: no task had a wide term
        task.pop("wide_fit", None), task.pop("wide_scale", None)
    run_job(d, name="r", runs_dir=tmp_path, stop_after=1, **QUIET)

    def drop_wide(config):  # and the wide term's settings, added later still
        config = json.loads(json.dumps(config))
        for task in config["model"]["tasks"].values():
            for key in ("wide", "wide_fit", "wide_scale"):
                task.pop(key)
        config["evaluation"].pop("average")  # and the averaged state (session 17)
        return config

    path = tmp_path / "r" / "config.json"
    path.write_text(json.dumps(drop_wide(json.loads(path.read_text()))))
    latest = round_checkpoints(tmp_path / "r")[0]
    tensors, meta = load_checkpoint(latest)
    shutil.rmtree(latest)
    checkpoint.save_checkpoint(latest, tensors, {**meta, "config": drop_wide(meta["config"])})
    # a task saved without `wide` is read as it was written (none), not as the task
    # plugin's default that an unset `wide` means today
    assert all(t.wide == [] for t in resumable_config(tmp_path / "r").model.tasks.values())
    assert resumable_config(tmp_path / "r").evaluation.average == 0  # no averaged state then
    out = resume_job(tmp_path / "r", **QUIET)
    assert len(out["history"]) == 2 and out["results"]["fed_moe"]

    meta["config"]["federation"]["lr"] = 0.5
    shutil.rmtree(latest)
    checkpoint.save_checkpoint(latest, tensors, {**meta, "config": drop_wide(meta["config"])})
    shutil.rmtree(round_checkpoints(tmp_path / "r")[0])  # round 2: resume from round 1 again
    with pytest.raises(CheckpointError, match="differing keys: federation.lr"):
        resume_job(tmp_path / "r", **QUIET)


def test_a_reused_name_is_refused_and_a_checkpoint_from_another_run_too(tmp_path):
    run_job(small_config(), name="r", runs_dir=tmp_path, stop_after=1, **QUIET)
    with pytest.raises(CheckpointError, match="already holds a run; choose another --name"):
        run_job(small_config(), name="r", runs_dir=tmp_path, stop_after=1, **QUIET)
    assert len(round_checkpoints(tmp_path / "r")) == 1  # the old run is untouched
    run_job(small_config(), name="other", runs_dir=tmp_path, stop_after=1, **QUIET)
    shutil.rmtree(tmp_path / "r" / "checkpoints")
    shutil.copytree(tmp_path / "other" / "checkpoints", tmp_path / "r" / "checkpoints")
    with pytest.raises(CheckpointError, match="belongs to another run"):
        resume_job(tmp_path / "r", **QUIET)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tmp_path):
    d = small_config()
    d["model"]["encoders"]["tabular"]["options"]["n_numeric"] = -1
    with pytest.raises(Exception, match="model.encoders.tabular.options"):
        run_job(d, name="bad", runs_dir=tmp_path, **QUIET)
    assert not (tmp_path / "bad").exists()


def test_a_run_name_cannot_leave_the_runs_folder(tmp_path):
    from m3tfed.errors import ConfigError

    with pytest.raises(ConfigError, match="--name: '../escape' is not a safe run name"):
        run_job(small_config(), name="../escape", runs_dir=tmp_path / "runs", **QUIET)
    assert not (tmp_path / "escape").exists()
