"""The trained state averaged over rounds (``evaluation.average``): validated beside each
round's own state and kept where it validates lower; it changes nothing in training."""

import json

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.baselines import BASELINES, BaselineContext
from m3tfed.federation.build import build_federation
from m3tfed.federation.checkpoint import checkpoint_path, load_checkpoint, split_owners
from m3tfed.federation.config import load_config
from m3tfed.federation.evaluation import (
    FinalTest,
    averaged_wins,
    exponential_average,
    institution_score,
    kept_now,
)
from m3tfed.federation.lifecycle import KEPT, run_job
from m3tfed.federation.server import AVERAGED_PREFIX

QUIET = {"progress": lambda m: None, "echo": False}


def test_the_average_weighs_the_past_by_beta():
    a = {"c": {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([1])}}
    b = {"c": {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor([5])}}
    first = exponential_average(None, a, 0.7)
    assert torch.equal(first["c"]["w"], a["c"]["w"]) and first["c"]["w"] is not a["c"]["w"]  # a copy
    out = exponential_average(first, b, 0.7)
    assert torch.allclose(out["c"]["w"], torch.tensor([0.7 * 1 + 0.3 * 3, 0.7 * 2 + 0.3 * 6]))
    assert torch.equal(out["c"]["n"], b["c"]["n"])  # not floating point: the latest value
    assert torch.equal(first["c"]["w"], a["c"]["w"])  # the earlier average is left as it was


def test_the_average_stands_in_per_institution_or_for_all():
    rounds = {"a": 1.0, "b": 1.0}
    assert averaged_wins("each", rounds, {"a": 0.5, "b": 1.2}) == {"a"}
    assert averaged_wins("best", rounds, {"a": 0.5, "b": 1.2}) == {"a", "b"}  # mean 0.85 < 1
    assert averaged_wins("best", rounds, {"a": 0.9, "b": 1.2}) == set()
    assert averaged_wins("each", rounds, dict(rounds)) == set()  # a tie keeps the round's own state


def config(average: float, rounds: int = 4) -> dict:
    d = tiny_config_dict(rounds=rounds, n=16)
    d["evaluation"]["average"] = average
    return d


def scores(entry: dict) -> dict[str, float]:
    return {n: institution_score(tasks) for n, tasks in entry["metrics"].items()}


def test_the_federated_moe_keeps_the_average_where_it_validates_lower(tmp_path):
    # 6 rounds: by then the average is the lower at some institutions' kept rounds
    off = run_job(config(0.0, rounds=6), name="off", runs_dir=tmp_path, **QUIET)
    on = run_job(config(0.5, rounds=6), name="on", runs_dir=tmp_path, **QUIET)
    # training is the same: every round's loss (and so its state)
    assert [h["loss"] for h in on["history"]] == [h["loss"] for h in off["history"]]
    curves = {k: json.loads((tmp_path / k / "curves.json").read_text()) for k in ("off", "on")}
    picked = 0
    for e_off, e_on in zip(curves["off"], curves["on"], strict=True):
        own, with_average = scores(e_off), scores(e_on)
        for name in own:  # each figure is the lower of the two states'; ties keep the round's
            if name in e_on.get("averaged", ()):  # none at round 1, when the average is its state
                assert with_average[name] < own[name]
                picked += 1
            else:
                assert with_average[name] == own[name]
    assert picked  # some institution validates lower with the average in this run
    # the round checkpoints carry the average: after round 2, half round 1's state and half round 2's
    ck = {r: load_checkpoint(checkpoint_path(tmp_path / "on", r))[0] for r in (1, 2)}
    averaged_keys = [k for k in ck[2] if k.startswith(AVERAGED_PREFIX)]
    assert averaged_keys
    for key in averaged_keys:
        plain = key.removeprefix(AVERAGED_PREFIX)
        if ck[2][key].is_floating_point():
            assert torch.allclose(ck[2][key], 0.5 * ck[1][plain] + 0.5 * ck[2][plain], atol=1e-6), plain
    # what an institution is tested with is its kept round's state, or that round's average
    kinds = set()
    for name, rnd in on["kept_round"].items():
        tensors, meta = load_checkpoint(tmp_path / "on" / KEPT / name)
        kinds.add(meta["averaged"])
        prefix = AVERAGED_PREFIX if meta["averaged"] else ""
        shared = split_owners(tensors)["@server"]
        round_state = load_checkpoint(checkpoint_path(tmp_path / "on", rnd))[0]
        assert shared and all(torch.equal(v, round_state[prefix + k]) for k, v in shared.items()), name
        entry = next(e for e in curves["on"] if e["round"] == rnd)
        assert meta["averaged"] == (name in entry.get("averaged", ()))
    assert kinds == {True, False}  # some institutions are tested with the average, some not
    assert on["results"]["fed_moe"].keys() == off["results"]["fed_moe"].keys()


def test_one_state_for_all_is_the_average_where_its_mean_validates_lower(tmp_path):
    """With ``keep = "last"`` (and ``"best"``) one state serves every institution: the last
    round's, or its average when their mean validation loss is lower, saved as such."""
    d = config(0.5, rounds=6)
    d["evaluation"]["keep"] = "last"
    out = run_job(d, name="last", runs_dir=tmp_path, **QUIET)
    last = json.loads((tmp_path / "last" / "curves.json").read_text())[-1]
    tensors, meta = load_checkpoint(tmp_path / "last" / KEPT)
    assert out["kept_round"] == 6 and meta["averaged"] and sorted(last["averaged"]) == sorted(last["metrics"])
    round_state = load_checkpoint(checkpoint_path(tmp_path / "last", 6))[0]
    shared = split_owners(tensors)["@server"]
    assert shared and all(torch.equal(v, round_state[AVERAGED_PREFIX + k]) for k, v in shared.items())


def baseline_curves(method: str, average: float) -> tuple[dict, list[dict]]:
    d = config(average)
    d["institutions"] = d["institutions"][:4]
    ctx = BaselineContext(final=FinalTest("val"), progress=lambda m: None)
    out = BASELINES[method].run(build_federation(load_config(d)), ctx)
    return out, ctx.curves[method]


def test_every_method_with_rounds_may_keep_its_average():
    """The same candidate for every method that has rounds: local's, Ditto's and the
    centralized bound's own models, and the server state of the dense baselines. Its
    validation curve is never above the run without it (the same training), and lower
    somewhere."""
    for method in ("local", "dense_fedavg", "ditto", "centralized"):
        (_, off), (_, on) = baseline_curves(method, 0.0), baseline_curves(method, 0.5)
        assert [e["round"] for e in on] == [e["round"] for e in off]
        assert all(a["val_loss"] <= b["val_loss"] + 1e-12 for a, b in zip(on, off)), method
        assert any(a["val_loss"] < b["val_loss"] for a, b in zip(on, off)), method


def test_a_group_chooses_by_its_mean():
    groups = {"a": "g", "b": "g", "c": "h"}
    earlier = [{"a": 1.0, "b": 2.0, "c": 1.0}]
    # a is lower alone, but its group's mean (0.5 + 2.5) / 2 = 1.5 is level with 1.5: not kept
    assert kept_now("group", earlier, {"a": 0.5, "b": 2.5, "c": 0.9}, groups) == ["c"]
    assert kept_now("each", earlier, {"a": 0.5, "b": 2.5, "c": 0.9}) == ["a", "c"]
    assert kept_now("group", earlier, {"a": 1.2, "b": 1.7, "c": 1.1}, groups) == ["a", "b"]  # b kept with its group
    # the averaged state stands in for a whole group, by the group's means
    assert averaged_wins("group", {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.7, "b": 1.1, "c": 1.2}, groups) == {"a", "b"}
    assert averaged_wins("each", {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.7, "b": 1.1, "c": 1.2}) == {"a"}
    # a member that diverged (NaN) is never kept and does not hold its group back
    nan = float("nan")
    assert kept_now("group", [{"a": 1.0, "b": 1.0, "c": 1.0}], {"a": nan, "b": 0.1, "c": 2.0}, groups) == ["b"]
    # an earlier round without every member of this one is no yardstick for a group mean
    assert kept_now("group", [{"a": 0.5, "c": 1.0}, {"a": 0.6, "b": 0.9, "c": 1.0}], {"a": 0.6, "b": 0.7, "c": 0.9}, groups) == ["a", "b", "c"]
    # the group rule without the groups is a named error, not a TypeError deep inside
    with pytest.raises(ValueError, match=r"choice group .*\['a', 'b', 'c'\]"):
        kept_now("group", earlier, {"a": 0.5, "b": 2.5, "c": 0.9})
    with pytest.raises(ValueError, match=r"none for \['c'\]"):
        averaged_wins("group", {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 0.7, "b": 1.1, "c": 1.2}, {"a": "g", "b": "g"})


def same_group_config(keep: str) -> dict:
    d = config(0.5, rounds=6)
    d["evaluation"]["keep"] = keep
    uni = next(i for i in d["institutions"] if i["name"] == "university")
    uni["tasks"], uni["modalities"] = ["grade"], ["tabular"]  # the rural school's tasks and modality
    return d


def test_institutions_with_the_same_tasks_and_modalities_choose_their_round_together(tmp_path):
    """keep = "group" (the default): the university and the rural school serve the same
    task from the same modality, so both are tested at the round (and candidate) where
    their mean validation loss is lowest; alone (keep = "each") they choose apart."""
    rounds = {}
    for keep in ("group", "each"):
        out = run_job(same_group_config(keep), name=keep, runs_dir=tmp_path, **QUIET)
        curves = json.loads((tmp_path / keep / "curves.json").read_text())
        rounds[keep] = out["kept_round"]
        if keep == "group":
            pair = [(scores(e)["university"] + scores(e)["rural_school"]) / 2 for e in curves]
            assert rounds[keep]["university"] == rounds[keep]["rural_school"] == curves[pair.index(min(pair))]["round"]
            assert all(("university" in e.get("averaged", ())) == ("rural_school" in e.get("averaged", ())) for e in curves)
    assert rounds["each"]["university"] != rounds["each"]["rural_school"]  # apart, they differ here


def test_local_chooses_alone_under_every_rule(monkeypatch):
    """An institution training alone chooses its round alone, also where the federation's
    institutions choose as a group: in this federation the university and the rural school
    keep the same round under the group rule (test above), training alone they do not."""
    import m3tfed.federation.baselines.local as local

    for keep in ("group", "each"):
        calls = []
        real = local.kept_now
        monkeypatch.setattr(local, "kept_now", lambda *a, real=real, calls=calls: calls.append((a[0], real(*a))) or calls[-1][1])
        d = same_group_config(keep)
        ctx = BaselineContext(final=FinalTest("val"), progress=lambda m: None)
        BASELINES["local"].run(build_federation(load_config(d)), ctx)
        assert {rule for rule, _ in calls} == {"each"}
        last = {n: r for r, (_, names) in enumerate(calls, 1) for n in names}  # every round evaluated
        assert last["university"] != last["rural_school"]


def test_the_dense_baselines_choose_by_the_same_rule(monkeypatch):
    """train_variant (dense FedAvg, FedProx, FedAvg + fine-tuning, Ditto's rounds) keeps a
    group's institutions at the round of their lowest mean, as the federated MoE's run;
    scripted validation losses: alone the university would keep round 2, the rural school
    round 4, together round 3."""
    import m3tfed.federation.baselines.common as common
    from m3tfed.federation.baselines.dense_fedavg import dense_config

    losses = {"university": [0.9, 0.5, 0.6, 0.9, 0.9, 0.9], "rural_school": [0.9, 0.9, 0.6, 0.5, 0.9, 0.9]}

    def scripted(fed, keep, groups, limit=None):
        rnd = fed.server.round
        return {n: {"grade": {"loss": losses.get(n, [0.5] * 6)[rnd - 1]}} for n in fed.institutions}, None

    monkeypatch.setattr(common, "validate_round", scripted)
    ctx = BaselineContext(final=FinalTest("val"), progress=lambda m: None)
    for keep, university, rural in (("group", 3, 3), ("each", 2, 4)):
        cfg = load_config(same_group_config(keep))
        _, kept, _ = common.train_variant(build_federation(cfg), dense_config(cfg), ctx, "dense")
        assert (kept["university"], kept["rural_school"]) == (university, rural), keep
