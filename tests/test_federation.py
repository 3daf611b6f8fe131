import json

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed import CheckpointError, FederationError
from m3tfed.federation.build import build_federation
from m3tfed.federation.checkpoint import latest_checkpoint, load_checkpoint, round_checkpoints
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import resume_job, run_job


def federation(**kw):
    return build_federation(load_config(tiny_config_dict(**kw)))


def snapshot(state):
    return {c: {k: v.clone() for k, v in s.items()} for c, s in state.items()}


def test_components_aggregate_over_their_contributors_only():
    fed = federation()
    before = snapshot(fed.server.state)
    rep = fed.server.run_round(1)
    # only image institutions train the image encoder and the vision expert
    assert rep.contributors["encoder.image"] == ["math_academy", "online_tutor"]
    assert "rural_school" in rep.contributors["encoder.tabular"] and "online_tutor" not in rep.contributors["encoder.tabular"]
    assert rep.contributors["expert.vision_0"] == ["online_tutor"] and rep.contributors["expert.vision_1"] == ["math_academy"]
    assert "rural_school" in rep.contributors["expert.small_0"] or "rural_school" in rep.contributors["expert.small_1"]
    for comp in fed.server.state:
        changed = any(not torch.equal(before[comp][k], v) for k, v in fed.server.state[comp].items())
        assert changed == (comp in rep.contributors), comp
        assert fed.server.versions[comp] == (1 if comp in rep.contributors else 0)


def test_an_unused_component_stays_unchanged():
    d = tiny_config_dict()
    d["model"]["experts"].append({"name": "unused", "plugin": "swiglu", "options": {"hidden": 16}, "modalities": ["image"]})
    for inst in d["institutions"]:
        if "image" in inst["modalities"]:
            inst["experts"] = ["general_0", "vision_0"]
    fed = build_federation(load_config(d))
    before = snapshot(fed.server.state)
    rep = fed.server.run_round(1)
    assert "expert.unused" not in rep.contributors
    assert all(torch.equal(before["expert.unused"][k], v) for k, v in fed.server.state["expert.unused"].items())
    assert fed.server.versions["expert.unused"] == 0


def test_personal_components_never_leave_the_institution():
    fed = federation(rounds=2)
    fed.server.run_round(1)
    fed.server.run_round(2)
    log = fed.server.backend.transcript
    ups = [e for e in log if e["institution"] == "math_academy" and e["direction"] == "up"]
    downs = [e for e in log if e["institution"] == "math_academy" and e["direction"] == "down"]
    assert ups and all("task.symbol" not in e["components"] for e in ups)
    # the server sends the initial value once, then never again
    assert "task.symbol" in downs[0]["components"] and "task.symbol" not in downs[1]["components"]
    assert "task.symbol" in fed.institutions["math_academy"].personal_state
    # online_tutor shares task.symbol, so the global copy only has online_tutor's updates
    assert fed.server.history[0].contributors["task.symbol"] == ["online_tutor"]


def test_expert_updates_are_weighted_by_routed_tokens():
    fed = federation()
    captured = {}
    agg = fed.server.aggregators["expert"]
    original = agg.aggregate

    def spy(component, current, updates):
        captured[component] = {u.institution: u.weight for u in updates}
        return original(component, current, updates)

    agg.aggregate = spy
    fed.server.run_round(1)
    weights = captured["expert.tabular_0"]
    n_train = {n: i.data.num_train for n, i in fed.institutions.items()}
    assert all(w > 0 and float(w).is_integer() for w in weights.values())
    assert any(weights[n] != n_train[n] for n in weights)  # tokens, not samples


def test_faults_drop_the_institution_with_the_reason(monkeypatch):
    fed = federation()
    insts = fed.institutions

    def boom(job):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(insts["university"], "train", boom)
    original = insts["high_school"].train

    def nan_result(job):
        res = original(job)
        first = res.updates[0]
        key = next(iter(first.delta))
        first.delta[key] = first.delta[key] * float("nan")
        return res

    monkeypatch.setattr(insts["high_school"], "train", nan_result)
    rep = fed.server.run_round(1)
    assert rep.dropped["university"] == "raised RuntimeError: disk on fire"
    assert rep.dropped["high_school"].startswith("non-finite values in")
    assert "university" not in rep.succeeded and len(rep.succeeded) == 4
    assert all("university" not in c and "high_school" not in c for c in rep.contributors.values())


def test_timeout_drops_and_too_few_institutions_stop_the_run():
    fed = federation(timeout_s=1e-9, max_retries=1)
    with pytest.raises(FederationError, match="only 0 institutions succeeded after 2 attempts"):
        fed.server.run_round(1)


def test_deterministic_under_a_seed():
    a, b = federation(), federation()
    a.server.run_round(1)
    b.server.run_round(1)
    for comp, s in a.server.state.items():
        for k, v in s.items():
            assert torch.equal(v, b.server.state[comp][k]), (comp, k)


def final_tensors(run_dir):
    return load_checkpoint(latest_checkpoint(run_dir))[0]


def test_resume_after_round_2_equals_an_uninterrupted_run(tmp_path):
    cfg = tiny_config_dict(rounds=4)
    cfg["aggregation"] = {"default": {"plugin": "fedavg"}, "expert": {"plugin": "fedadam", "options": {"eta": 0.01}}}
    run_job(cfg, name="full", runs_dir=tmp_path, progress=lambda m: None)
    run_job(cfg, name="split", runs_dir=tmp_path, stop_after=2, progress=lambda m: None)
    assert round_checkpoints(tmp_path / "split")[0].name == "round_0002"
    resume_job(tmp_path / "split", progress=lambda m: None)
    full, split = final_tensors(tmp_path / "full"), final_tensors(tmp_path / "split")
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k
    # the ledger says who contributed to what in which round
    meta = load_checkpoint(latest_checkpoint(tmp_path / "split"))[1]
    rounds = {r for r, _, _ in meta["contributions"]}
    assert rounds == {1, 2, 3, 4}
    assert [4, "math_academy", "encoder.image"] in meta["contributions"]


def test_resume_reports_a_corrupt_checkpoint(tmp_path):
    run_job(tiny_config_dict(rounds=2), name="r", runs_dir=tmp_path, stop_after=1, progress=lambda m: None)
    ckpt = tmp_path / "r" / "checkpoints" / "round_0001"
    data = (ckpt / "tensors.safetensors").read_bytes()
    (ckpt / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        resume_job(tmp_path / "r", progress=lambda m: None)


def test_main_job_smoke_writes_its_files(tmp_path, capsys):
    cfg = tiny_config_dict(rounds=2)
    cfg["evaluation"] = {"baselines": ["local", "dense_fedavg"], "personalize": True, "plots": True}
    out = run_job(cfg, name="smoke", runs_dir=tmp_path, progress=lambda m: None)
    run = tmp_path / "smoke"
    for f in ["config.json", "metrics.json", "routing.json", "curves.json", "learning_curves.png", "institutions.png", "expert_usage.png"]:
        assert (run / f).stat().st_size > 0, f
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["round_0001", "round_0002"]
    metrics = json.loads((run / "metrics.json").read_text())
    grade = metrics["summary"]["grade"]
    assert set(grade["summary"]) == {"fed_moe", "personalized", "local", "dense_fedavg"}
    assert set(grade["institutions"]) == {"high_school", "university", "rural_school", "community_college", "math_academy"}
    for method, s in grade["summary"].items():
        vals = [row[method] for row in grade["institutions"].values()]
        assert s["worst"] == max(vals) and abs(s["mean"] - sum(vals) / len(vals)) < 1e-9  # rmse: lower is better
    routing = json.loads((run / "routing.json").read_text())
    experts = routing["experts"]
    rural = dict(zip(experts, routing["tokens"]["rural_school"]["grade"]))
    assert len(experts) == 13 and {e for e, n in rural.items() if n} <= {"small_0", "small_1"} and sum(rural.values()) > 0
    # per modality too: every institution's modalities, each with tokens routed
    by_modality = routing["tokens_by_modality"]
    assert {n: set(m) for n, m in by_modality.items()} == {i["name"]: set(i["modalities"]) for i in cfg["institutions"]}
    assert all(sum(c) > 0 for m in by_modality.values() for c in m.values())
    assert {"modality", "modality_within_institution"} <= set(metrics["routing_mutual_information"])
    table = capsys.readouterr().out
    assert "grade — rmse (lower is better)" in table and "worst" in table
    assert out["communication"]["bytes_up"] > 0


def test_frozen_backbones_are_held_once_and_never_travel():
    d = tiny_config_dict()
    d["model"]["encoders"]["text"]["options"]["freeze_backbone"] = True
    fed = build_federation(load_config(d))
    hs, cc = fed.institutions["high_school"].model(), fed.institutions["community_college"].model()
    assert hs is not cc  # different selections, different model objects...
    frozen_hs = {n: p for n, p in hs.named_parameters() if not p.requires_grad}
    frozen_cc = {n: p for n, p in cc.named_parameters() if not p.requires_grad}
    assert frozen_hs and frozen_hs.keys() == frozen_cc.keys()
    assert all(frozen_hs[n].data_ptr() == frozen_cc[n].data_ptr() for n in frozen_hs)  # ...one copy of the backbone
    fed.server.run_round(1)
    sent = {k for e in fed.server.backend.transcript for k in e["components"]}
    assert "encoder.text" in sent
    text_params = fed.server.state["encoder.text"]
    assert text_params and not any(n in text_params for n in frozen_hs)


def test_capabilities_are_discovered_by_message_not_configured_twice():
    fed = federation()
    name, inst = next(iter(fed.institutions.items()))
    caps = fed.server.backend.ask(name, "capabilities", {"round": 0})
    assert caps["modalities"] == inst.config.modalities and caps["tasks"] == inst.config.tasks
    assert caps["components"] == fed.server.backend.components_of(name)
    assert caps["num_train"] == inst.data.num_train
    with pytest.raises(ValueError, match="unknown message kind 'nonsense'"):
        fed.server.backend.ask(name, "nonsense", {})


def test_centralized_baseline_and_comparison_are_reported(tmp_path):
    cfg = tiny_config_dict(rounds=2)
    cfg["evaluation"] = {"baselines": ["local", "centralized"], "personalize": False, "plots": False}
    out = run_job(cfg, name="c", runs_dir=tmp_path, progress=lambda m: None)
    assert set(out["results"]) == {"fed_moe", "local", "centralized"}
    for s in out["summary"].values():
        for row in s["institutions"].values():
            assert all(v == v for v in row.values())  # finite metrics for every method
    comp = out["comparison"]
    assert set(comp) == {"local", "centralized"}
    adv = comp["local"]["institutions"]
    assert len(adv) == len(cfg["institutions"])
    assert comp["local"]["mean_relative_advantage"] == sum(adv.values()) / len(adv)
    assert json.loads((tmp_path / "c" / "data_report.json").read_text()).keys() == {i["name"] for i in cfg["institutions"]}


def test_relative_advantage_respects_the_metric_direction():
    from m3tfed.federation.report import relative_advantage

    summary = {
        "grade": {"higher_is_better": False, "institutions": {"a": {"fed_moe": 0.9, "local": 1.0}}},
        "pass": {"higher_is_better": True, "institutions": {"a": {"fed_moe": 0.77, "local": 0.70}, "b": {"fed_moe": 0.6, "local": 0.75}}},
    }
    adv = relative_advantage(summary, "fed_moe", "local")
    # relative to the baseline's mean on the task: grade 1.0, pass (0.70 + 0.75) / 2
    assert adv["a"] == pytest.approx((0.1 + 0.07 / 0.725) / 2)  # 10% lower RMSE, 9.7% higher accuracy
    assert adv["b"] == pytest.approx(-0.15 / 0.725)


def test_relative_advantage_stays_finite_when_a_baseline_scores_zero():
    from m3tfed.federation.report import relative_advantage

    summary = {"symbols": {"higher_is_better": True, "institutions": {"a": {"fed_moe": 0.2, "local": 0.0}, "b": {"fed_moe": 0.4, "local": 0.4}}}}
    adv = relative_advantage(summary, "fed_moe", "local")
    assert adv == {"a": pytest.approx(0.2 / 0.2), "b": 0.0}
    # a baseline at 0 everywhere (a degenerate AUC): scaled by both methods' mean, not 1e-8
    summary = {"next": {"higher_is_better": True, "institutions": {"a": {"fed_moe": 0.6, "local": 0.0}, "b": {"fed_moe": 0.0, "local": 0.0}}}}
    assert relative_advantage(summary, "fed_moe", "local") == {"a": pytest.approx(0.6 / 0.15), "b": 0.0}
    none = {"next": {"higher_is_better": True, "institutions": {"a": {"fed_moe": 0.0, "local": 0.0}}}}
    assert relative_advantage(none, "fed_moe", "local") == {"a": 0.0}


def test_centralized_baseline_keeps_what_institutions_keep_personal():
    from m3tfed.federation.baselines import BaselineContext, Centralized
    from m3tfed.federation.evaluation import FinalTest

    def centralized(personal):
        d = tiny_config_dict(rounds=1)
        for inst in d["institutions"]:
            inst["personal"] = personal
        cfg = load_config(d)
        return Centralized().run(build_federation(cfg), BaselineContext(FinalTest(), progress=lambda m: None))

    shared, shared_again, own_router = centralized([]), centralized([]), centralized(["router"])
    assert shared == shared_again  # deterministic under the seed
    # each institution's own router (own values, own optimizer state) changes its results
    loss = {name: sum(m["loss"] for m in r.values()) for name, r in own_router.items()}
    assert all(torch.isfinite(torch.tensor(v)) for v in loss.values())
    assert sum(abs(loss[n] - sum(m["loss"] for m in shared[n].values())) for n in loss) > 1e-4
