"""Under differential privacy or secure aggregation nothing about one institution's
data leaves in the clear: no loss, no sample count, no routing counts, weights that are
public (1) or inside the mask, and an update for every component of its job."""

import pytest
from conftest import tiny_config_dict
from m3tfed.errors import ConfigError
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.training import PlainTrainer


def replies_of_one_round(policies: dict[int, dict]):
    d = tiny_config_dict(rounds=1)
    for i, pol in policies.items():
        d["institutions"][i]["policy"] = pol
    fed = build_federation(load_config(d))
    backend, seen = fed.server.backend, {}
    train = backend.train

    def spy(jobs):
        results = train(jobs)
        seen.update({j.institution: (j, r) for j, r in zip(jobs, results)})
        return results

    backend.train = spy
    rep = fed.server.run_round(1)
    return fed, rep, seen


@pytest.mark.parametrize(
    "policy",
    [
        {"dp": "local", "epsilon": 50.0, "noise_multiplier": 1.0},
        {"dp": "central", "epsilon": 50.0, "noise_multiplier": 1.0},
    ],
)
def test_a_dp_reply_carries_no_statistics_and_every_component(policy):
    # Hole: outside secure aggregation a DP institution still sent its training loss,
    # tokens per expert, its sample count (as num_samples and as every update's weight)
    # and left out experts no token reached.
    fed, rep, seen = replies_of_one_round({0: policy})
    job, res = seen["high_school"]
    assert res.loss is None and res.tokens_per_expert == {} and res.num_samples == 0
    assert all(u.weight == 1.0 for u in res.updates)
    sent = {c for c in job.components if not fed.institutions["high_school"].is_personal(c)}
    assert {u.component for u in res.updates} == sent  # experts included, routed or not
    # institutions without a policy still report theirs, and the round's loss is theirs
    other = seen["university"][1]
    assert other.loss is not None and other.num_samples > 0
    assert rep.loss == pytest.approx(
        sum(r.loss for n, (_, r) in seen.items() if r.loss is not None) / 5
    )
    # nor does the capabilities answer carry the DP institution's sample count
    ask = fed.server.backend.ask
    assert "num_train" not in ask("high_school", "capabilities", {})
    assert ask("university", "capabilities", {})["num_train"] > 0


def test_a_secure_aggregation_reply_carries_no_statistics_and_masks_every_component():
    fed, rep, seen = replies_of_one_round({i: {"secure_aggregation": True} for i in range(6)})
    stage = next(s for s in fed.server.server_stages if type(s).__name__ == "SecureAggregation")
    for name, (job, res) in seen.items():
        assert res.loss is None and res.tokens_per_expert == {} and res.num_samples == 0
        # weights travel inside the mask; what is in the clear is 0 for everyone
        assert all(u.weight == 0.0 and set(u.delta) == {"secagg.masked"} for u in res.updates)
        sent = {c for c in job.components if not fed.institutions[name].is_personal(c)}
        # all but the components it holds alone, whose group of one its client refuses
        assert {u.component for u in res.updates} == sent - set(stage.clients[name].refused)
    assert rep.loss != rep.loss  # nan: nobody disclosed a loss


def test_an_expert_nobody_routed_to_is_still_sent_under_dp():
    # Force the case: an institution whose routing sends no token to one of its experts.
    d = tiny_config_dict(rounds=1)
    d["institutions"][0]["policy"] = {"dp": "local", "epsilon": 50.0, "noise_multiplier": 1.0}
    fed = build_federation(load_config(d))
    inst = fed.institutions["high_school"]

    class NoTokensForTheFirstExpert(PlainTrainer):
        def fit(self, institution, model, run):
            done = super().fit(institution, model, run)
            done.tokens = {k: v for k, v in done.tokens.items() if k != inst.experts[0]}
            return done

    inst.trainer = NoTokensForTheFirstExpert()
    job = fed.server.make_job("high_school", 1, 0)
    res = inst.train(job)
    assert f"expert.{inst.experts[0]}" in {u.component for u in res.updates}
    # without a policy the institution leaves it out (it did not train it): the filed behaviour
    inst.privacy = None  # (picks its trainers again)
    inst.trainer = NoTokensForTheFirstExpert()
    inst.stages = [s for s in inst.stages if type(s).__name__ != "LocalPrivacy"]
    res = inst.train(fed.server.make_job("high_school", 1, 1))
    assert fed.config.federation.weight_experts_by == "tokens"
    assert f"expert.{inst.experts[0]}" not in {u.component for u in res.updates}


@pytest.mark.parametrize(
    "policy",
    [
        {"dp": "local", "epsilon": 50.0, "noise_multiplier": 1.0},
        {"dp": "central", "epsilon": 50.0, "noise_multiplier": 1.0},
        {"dp": "sample", "epsilon": 50.0, "noise_multiplier": 1.0},
        {"secure_aggregation": True},
    ],
)
def test_local_epochs_is_refused_when_an_institution_withholds_statistics(policy):
    # Hole: local_epochs made the step count local_epochs * num_train / batch_size; the
    # capabilities answer, the job the server sends and the ledger carried it, so the
    # sample count that the reply withholds could be read back from the steps.
    d = tiny_config_dict(rounds=1, local_epochs=1.0)
    d["institutions"][0]["policy"] = policy
    with pytest.raises(ConfigError) as err:
        load_config(d)
    assert err.value.path == "federation.local_epochs"
    assert "'high_school'" in err.value.problem and "federation.local_steps" in err.value.problem
    # without a policy the steps follow the data, as documented
    load_config(tiny_config_dict(rounds=1, local_epochs=1.0))


def test_local_epochs_is_refused_under_a_masking_stage_of_the_pipeline():
    cfg = load_config(tiny_config_dict(rounds=1, local_epochs=1.0, pipeline=[{"plugin": "secagg"}]))
    with pytest.raises(ConfigError) as err:
        build_federation(cfg)
    assert err.value.path == "federation.local_epochs" and "'university'" in err.value.problem


@pytest.mark.parametrize(
    "policy",
    [
        {"dp": "local", "epsilon": 50.0, "noise_multiplier": 1.0},
        {"dp": "central", "epsilon": 50.0, "noise_multiplier": 1.0},
    ],
)
def test_nothing_that_leaves_a_dp_institution_depends_on_its_sample_count(policy):
    # Two federations whose institutions differ only in their number of students: what
    # leaves the DP institution (its capabilities, the job asked of it, its reply, its
    # privacy report) is the same.
    seen = []
    for n in (24, 48):
        d = tiny_config_dict(rounds=1, n=n)
        d["institutions"][0]["policy"] = policy
        fed = build_federation(load_config(d))
        assert fed.institutions["high_school"].data.num_train > 0
        ask = fed.server.backend.ask
        caps = ask("high_school", "capabilities", {})
        job = fed.server.make_job("high_school", 1, 0)
        res = fed.institutions["high_school"].train(job)
        report = ask("high_school", "privacy_report", {"round": 1})
        seen.append(
            {
                "num_train": fed.institutions["high_school"].data.num_train,
                "capabilities": caps,
                "steps": job.steps,
                "reply": (
                    res.num_samples,
                    res.loss,
                    res.tokens_per_expert,
                    [u.weight for u in res.updates],
                ),
                "releases": report["releases"],
                "accountant": report["accountant_history"],
                "epsilon": report["epsilon_total"],
            }
        )
    small, large = seen
    assert small.pop("num_train") < large.pop("num_train")
    assert small == large
    assert small["steps"] == 2 and small["reply"][0] == 0 and small["releases"]


def test_fairness_weighting_leaves_a_withheld_loss_alone():
    # q-FFL weighs updates by reported losses: a DP institution reports none, so its
    # update weighs as the mean of the others (the round used to fail on float(None))
    # and the round's record of losses leaves it out
    d = tiny_config_dict(rounds=1)
    d["institutions"][0]["policy"] = {"dp": "local", "epsilon": 50.0, "noise_multiplier": 1.0}
    d["federation"] = {**d.get("federation", {}), "fairness_q": 1.0}
    fed = build_federation(load_config(d))
    rep = fed.server.run_round(1)
    assert "high_school" in rep.succeeded and "high_school" not in rep.losses
    assert set(rep.losses) == set(rep.succeeded) - {"high_school"}
