"""Privacy policies: presets, overrides, bad input, per-component enforcement, ledger."""

import json
import math

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.errors import ConfigError
from m3tfed.federation.build import build_federation, privacy_ledger
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import run_job
from m3tfed.privacy.dp import epsilon_of, noise_multiplier_for
from m3tfed.privacy.policy import PRESETS, PolicyConfig, resolve_policy


def with_policy(policies: dict[int, dict], rounds: int = 2, **federation):
    d = tiny_config_dict(rounds=rounds, **federation)
    for i, pol in policies.items():
        d["institutions"][i]["policy"] = pol
    return d


def test_presets_fill_defaults_and_fields_override():
    pol = resolve_policy("a", PolicyConfig(profile="gdpr"))
    assert (pol.dp, pol.epsilon, pol.secure_aggregation, pol.forget_on_request) == ("central", 4.0, True, True)
    assert pol.cohort_for("expert.text_0") == 3
    pol = resolve_policy("a", PolicyConfig(profile="coppa", epsilon=1.5, secure_aggregation=False, min_cohort={"expert": 2}))
    assert (pol.dp, pol.epsilon, pol.delta, pol.secure_aggregation) == ("sample", 1.5, 1e-6, False)
    # a component beats its group, the group beats the default
    pol = resolve_policy("a", PolicyConfig(min_cohort={"expert": 2, "expert.x": 4, "default": 3}))
    assert (pol.cohort_for("expert.x"), pol.cohort_for("expert.y"), pol.cohort_for("trunk")) == (4, 2, 3)
    assert resolve_policy("a", PolicyConfig(min_cohort=2)).cohort_for("router") == 2
    assert not resolve_policy("a", PolicyConfig()).active
    assert set(PRESETS) == {"none", "ferpa", "gdpr", "coppa"}


@pytest.mark.parametrize(
    "policy, path, words",
    [
        ({"profile": "hipaa"}, "institutions[0].policy.profile", "not allowed"),
        ({"epsilom": 3}, "institutions[0].policy.epsilom", "unknown key"),
        ({"dp": "central", "epsilon": 0}, "institutions[0].policy.epsilon", "> 0"),
        ({"dp": "central", "epsilon": -1.0}, "institutions[0].policy.epsilon", "> 0"),
        ({"delta": 0.0}, "institutions[0].policy.delta", "> 0"),
        ({"dp": "local"}, "institutions[0].policy.epsilon", "needs an epsilon"),
        ({"min_cohort": 7}, "institutions[0].policy.min_cohort", "only 6 institutions"),
        ({"min_cohort": {"expert": 9}}, "institutions[0].policy.min_cohort.expert", "only 6 institutions"),
        ({"profile": "coppa", "secure_aggregation": False, "min_cohort": {"default": 0}}, "institutions[0].policy.min_cohort.default", ">= 1"),
        ({"dp": "sideways"}, "institutions[0].policy.dp", "not allowed"),
        ({"dp": "central", "noise_multiplier": 0}, "institutions[0].policy.noise_multiplier", "adds no noise"),
        ({"dp": "central", "epsilon": math.inf}, "institutions[0].policy.epsilon", "finite"),
        ({"min_cohort": {"expret": 5}}, "institutions[0].policy.min_cohort.expret", "encoder, expert, router, trunk, task"),
        ({"min_cohort": {"trunk.x": 2}}, "institutions[0].policy.min_cohort.trunk.x", "unknown component"),
    ],
)
def test_bad_policies_name_the_key(policy, path, words):
    with pytest.raises(ConfigError) as err:
        load_config(with_policy({0: policy}))
    assert err.value.path == path and words in str(err.value)


def test_secure_aggregation_required_but_unavailable_is_an_error():
    from m3tfed.plugin_manager import get_catalogue
    from m3tfed.specs import Catalogue

    # the installed catalogue without its secagg stage (as if that plugin were disallowed)
    full = get_catalogue()
    specs = {kind: dict(named) for kind, named in full.specs.items()}
    del specs["stage"]["secagg"]
    cfg = load_config(with_policy({1: {"profile": "ferpa"}}))
    with pytest.raises(ConfigError, match="secure aggregation is required by institution 'university'"):
        build_federation(cfg, Catalogue(specs=specs))


def test_small_cohort_holds_component_and_reports_it():
    # high_school insists on 4 contributors for every component: its text encoder is
    # trained by only 2 institutions (high_school, community_college), so it is held.
    cfg = load_config(with_policy({0: {"min_cohort": 4}}, rounds=1))
    fed = build_federation(cfg)
    before = {k: v.clone() for k, v in fed.server.state["encoder.text"].items()}
    rep = fed.server.run_round(1)
    assert "encoder.text" not in rep.contributors
    assert all(bool((fed.server.state["encoder.text"][k] == v).all()) for k, v in before.items())
    assert len(rep.contributors["trunk"]) == 6  # big enough cohorts still aggregate
    ledger = privacy_ledger(fed).to_dict()
    held = {(h["component"], h["rule"]) for h in ledger["institutions"]["high_school"]["1"]["held"]}
    assert ("encoder.text", "min_cohort") in held
    cc = ledger["institutions"]["community_college"]["1"]["held"]
    assert any(h["component"] == "encoder.text" and "required by high_school" in h["reason"] for h in cc)
    assert ledger["components"]["1"]["encoder.text"]["rule"] == "min_cohort"
    # Components high_school does not touch are not constrained by its policy.
    assert rep.contributors.get("encoder.image") == ["math_academy", "online_tutor"]


def test_spent_budget_stops_contributing_and_run_reports_it():
    # sigma = 1 with every institution sampled costs ~4.7 epsilon per round at delta 1e-5:
    # a budget of 6 allows one round.
    cfg = load_config(with_policy({0: {"dp": "local", "epsilon": 6.0, "noise_multiplier": 1.0}}, rounds=2))
    fed = build_federation(cfg)
    r1 = fed.server.run_round(1)
    assert "high_school" in r1.succeeded and "high_school" in r1.contributors["trunk"]
    r2 = fed.server.run_round(2)
    assert "high_school" not in r2.succeeded and "budget spent" in r2.dropped["high_school"]
    assert all("high_school" not in names for names in r2.contributors.values())
    rows = privacy_ledger(fed).to_dict()["institutions"]["high_school"]
    assert 4.0 < rows["1"]["epsilon_total"] <= 6.0 and rows["1"]["contributed"]
    assert "budget spent" in rows["2"]["refused"] and rows["2"]["contributed"] == []


def test_update_without_required_noise_is_held():
    from m3tfed.federation.aggregation import ComponentUpdate
    from m3tfed.plugins.pipeline.privacy import PolicyEnforcement
    from m3tfed.privacy.policy import resolve_policy

    stage = PolicyEnforcement()
    pol = resolve_policy("a", PolicyConfig(dp="local", epsilon=1.0))
    u = ComponentUpdate("a", "trunk", {}, 1.0)
    assert stage.unmet(u, pol, {"components": {}})[0] == "dp"
    assert "no noise" in stage.unmet(u, pol, {"components": {"trunk": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 0.0}}})[1]
    assert "clip norm" in stage.unmet(u, pol, {"components": {"trunk": {"mode": "local", "clip_norm": 5.0, "noise_multiplier": 1.0}}})[1]
    assert stage.unmet(u, pol, {"components": {"trunk": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 1.0}}}) is None
    sa = resolve_policy("a", PolicyConfig(secure_aggregation=True))
    assert stage.unmet(u, sa, {})[0] == "secure_aggregation"


def test_ledger_of_a_short_run(tmp_path):
    d = with_policy({0: {"dp": "central", "epsilon": 8.0}, 2: {"dp": "local", "epsilon": 50.0, "min_cohort": {"encoder": 2}}}, rounds=2)
    run_job(d, name="ledger", runs_dir=tmp_path, progress=lambda m: None)
    ledger = json.loads((tmp_path / "ledger" / "privacy_ledger.json").read_text())
    hs, ot = ledger["institutions"]["high_school"], ledger["institutions"]["online_tutor"]
    assert set(hs) == {"1", "2"} and set(ot) == {"1", "2"}
    # epsilon per round, cumulative, growing
    assert 0 < hs["1"]["epsilon_total"] < hs["2"]["epsilon_total"] <= 8.0
    assert hs["2"]["epsilon_round"] == pytest.approx(hs["2"]["epsilon_total"] - hs["1"]["epsilon_total"])
    assert "trunk" in hs["1"]["contributed"] and hs["1"]["cohorts"]["trunk"] == 6
    # central noise was added to high_school's components, with its recorded scale
    assert ledger["components"]["1"]["encoder.text"]["central_noise_std"] > 0
    assert "central_noise_std" not in ledger["components"]["1"]["encoder.image"]


ALL = ["community_college", "high_school", "math_academy", "online_tutor", "rural_school", "university"]


def secagg_stage(fed):
    return next(s for s in fed.server.server_stages if type(s).__name__ == "SecureAggregation")


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().double() for v in state.values()])


@pytest.mark.parametrize("mode", ["local", "central", "sample"])
def test_secure_aggregation_with_each_dp_mode(mode):
    # Every institution: sigma = 1, C = 1, masked; 14 training samples each (24: 14 train, 5 validation, 5 test).
    cfg = load_config(with_policy({i: {"dp": mode, "epsilon": 50.0, "noise_multiplier": 1.0, "secure_aggregation": True} for i in range(6)}, rounds=1))
    fed = build_federation(cfg)
    before = flat(fed.server.state["trunk"])
    rep = fed.server.run_round(1)
    # aggregated through secure aggregation, and the round names who was summed
    assert secagg_stage(fed).reports[-1]["components"]["trunk"]["survivors"] == ALL
    assert rep.contributors["trunk"] == ALL and fed.server.versions["trunk"] == 1
    assert sorted(n for r, n, c in fed.server.contributions if c == "trunk") == ALL
    moved = flat(fed.server.state["trunk"]) - before
    ledger = privacy_ledger(fed).to_dict()
    q = 8 / 14  # DP-SGD: batch 8 of 14 samples, 2 steps a round
    want = epsilon_of([(1.0, q, 2)], 1e-5) if mode == "sample" else epsilon_of([(1.0, 1.0, 1)], 1e-5)
    for name in ALL:
        row = ledger["institutions"][name]["1"]
        assert row["epsilon_total"] == pytest.approx(want) and "trunk" in row["contributed"]
        # held only where it is alone in a group (its client does not join a group of one)
        assert all(h["rule"] == "secure_aggregation" and "among 1 holders" in h["reason"] for h in row["held"])
    trunk = ledger["components"]["1"]["trunk"]
    if mode == "local":  # noise went on before masking: the mean of 6 carries std 1/sqrt(6)
        assert moved.std().item() == pytest.approx(1 / math.sqrt(6), rel=0.05)
        assert "central_noise_std" not in trunk
    elif mode == "central":  # after unmasking: sigma * C * max n / sum n = 14 / 84
        assert trunk["central_noise_std"] == pytest.approx(1 / 6)
        assert moved.std().item() == pytest.approx(1 / 6, rel=0.05)
    else:  # DP-SGD noise is per step and scaled by the learning rate: small, but there
        assert "central_noise_std" not in trunk and 0 < moved.abs().max().item() < 0.1


def test_cohort_is_checked_again_after_unmasking():
    # Every institution requires all 6 on the trunk; community_college's masked trunk
    # vector is malformed, so secure aggregation excludes it after the policy stage
    # counted 6 masked updates. The threshold was raised to the cohort (6), so the sum
    # of the 5 others cannot be unmasked at all: it is held.
    cfg = load_config(with_policy({i: {"secure_aggregation": True, "min_cohort": {"trunk": 6}} for i in range(6)}, rounds=1))
    fed = build_federation(cfg)
    cc = fed.institutions["community_college"]
    train = cc.train

    def malformed(job):
        res = train(job)
        for u in res.updates:
            if u.component == "trunk":
                u.delta["secagg.masked"] = u.delta["secagg.masked"][:-1]
        return res

    cc.train = malformed
    before = flat(fed.server.state["trunk"])
    rep = fed.server.run_round(1)
    assert "trunk" not in rep.contributors and torch.equal(flat(fed.server.state["trunk"]), before)
    assert rep.contributors["router"] == ALL  # the other components still aggregate
    ledger = privacy_ledger(fed).to_dict()
    trunk = ledger["components"]["1"]["trunk"]
    assert trunk["rule"] == "secure_aggregation" and not trunk["aggregated"]
    assert "threshold 6" in trunk["reason"] and trunk["contributors"] == sorted(set(ALL) - {"community_college"})
    assert [h["rule"] for h in ledger["institutions"]["community_college"]["1"]["held"]] == ["secure_aggregation"]
    assert "elements, expected" in ledger["institutions"]["community_college"]["1"]["held"][0]["reason"]
    hs = ledger["institutions"]["high_school"]["1"]
    assert [h["rule"] for h in hs["held"]] == ["secure_aggregation"] and "trunk" not in hs["contributed"] and "router" in hs["contributed"]


def test_retried_round_charges_every_attempt():
    # university fails its first attempt; min_institutions = 6 makes the server retrain all.
    cfg = load_config(with_policy({0: {"dp": "local", "epsilon": 50.0, "noise_multiplier": 1.0}}, rounds=1, min_institutions=6, max_retries=1))
    fed = build_federation(cfg)
    uni = fed.institutions["university"]
    train, calls = uni.train, []

    def flaky(job):
        calls.append(job)
        if len(calls) == 1:
            raise RuntimeError("power cut")
        return train(job)

    uni.train = flaky
    rep = fed.server.run_round(1)
    assert rep.attempts == 2 and rep.succeeded == ALL
    row = privacy_ledger(fed).to_dict()["institutions"]["high_school"]["1"]
    # high_school released two noisy updates of round 1: one Gaussian of sigma / sqrt(2)
    assert row["attempts"] == 2
    assert row["epsilon_total"] == pytest.approx(epsilon_of([(1 / math.sqrt(2), 1.0, 1)], 1e-5))
    assert row["epsilon_total"] > 1.3 * epsilon_of([(1.0, 1.0, 1)], 1e-5)


def test_ferpa_gdpr_and_coppa_profiles_end_to_end():
    # high_school: FERPA, university: GDPR, online_tutor: COPPA; the rest have no policy.
    cfg = load_config(with_policy({0: {"profile": "ferpa"}, 1: {"profile": "gdpr"}, 2: {"profile": "coppa"}}, rounds=1))
    fed = build_federation(cfg)
    hs, uni, ot = (fed.institutions[n].privacy for n in ("high_school", "university", "online_tutor"))
    # noise derived from each budget over the one planned round
    assert hs.noise_multiplier == pytest.approx(noise_multiplier_for(8.0, 1e-5, 1.0, 1))
    assert uni.noise_multiplier == pytest.approx(noise_multiplier_for(4.0, 1e-5, 1.0, 1))
    assert ot.noise_multiplier == pytest.approx(noise_multiplier_for(2.0, 1e-6, 8 / 14, 2))
    assert (uni.policy.forget_on_request, hs.policy.forget_on_request, ot.policy.forget_on_request) == (True, False, True)
    rep = fed.server.run_round(1)
    ledger = privacy_ledger(fed).to_dict()
    rows = {n: ledger["institutions"][n]["1"] for n in ("high_school", "university", "online_tutor")}
    # every update went through secure aggregation, and each stayed within its budget
    assert secagg_stage(fed).reports[-1]["components"]["trunk"]["survivors"] == ALL
    assert 0 < rows["high_school"]["epsilon_total"] <= 8.0 and 0 < rows["university"]["epsilon_total"] <= 4.0
    assert 0 < rows["online_tutor"]["epsilon_total"] <= 2.0
    assert ot.accountant.history == [(ot.noise_multiplier, 8 / 14, 2)]  # COPPA: DP-SGD, one entry per step batch
    # central noise for FERPA/GDPR with the stricter (GDPR) sigma, scaled by 14 of 84 samples
    assert ledger["components"]["1"]["trunk"]["central_noise_std"] == pytest.approx(uni.noise_multiplier / 6)
    assert rep.contributors["trunk"] == ALL
    # FERPA's cohort of 3: the text encoder (high_school, community_college) is held;
    # high_school's secure-aggregation client does not even join a group of 2
    assert "encoder.text" not in rep.contributors
    assert any(h["component"] == "encoder.text" and h["rule"] == "secure_aggregation" and "requires at least 3" in h["reason"] for h in rows["high_school"]["held"])
    # COPPA's cohort of 5: online_tutor does not join the interactions encoder's group of 3
    # (enough for GDPR's 3, not for COPPA's 5); the 2 left are too few for GDPR's 3
    assert "encoder.image" not in rep.contributors and "encoder.interactions" not in rep.contributors
    assert any(h["component"] == "encoder.interactions" and "requires at least 5" in h["reason"] for h in rows["online_tutor"]["held"])
    inter = ledger["components"]["1"]["encoder.interactions"]
    assert "min_cohort 3 required by university" in inter["reason"]
    # tabular (5 contributors, not online_tutor) meets FERPA's and GDPR's 3
    assert rep.contributors["encoder.tabular"] == ["community_college", "high_school", "math_academy", "rural_school", "university"]
