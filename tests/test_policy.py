"""Privacy policies: presets, overrides, bad input, per-component enforcement, ledger."""

import json

import pytest
from conftest import tiny_config_dict
from m3tfed.errors import ConfigError
from m3tfed.federation.config import load_config
from m3tfed.federation.job import build_federation, privacy_ledger, run_job
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
    ],
)
def test_bad_policies_name_the_key(policy, path, words):
    with pytest.raises(ConfigError) as err:
        load_config(with_policy({0: policy}))
    assert err.value.path == path and words in str(err.value)


def test_secure_aggregation_required_but_unavailable_is_an_error():
    from m3tfed.plugin_manager import get_catalogue

    cat = get_catalogue()
    if "secagg" in cat.specs["stage"]:
        pytest.skip("a secagg stage is installed; build_federation adds it instead")
    cfg = load_config(with_policy({1: {"profile": "ferpa"}}))
    with pytest.raises(ConfigError, match="secure aggregation is required by institution 'university'"):
        build_federation(cfg)


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
