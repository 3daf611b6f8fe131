"""Each institution enforces its own policy, whatever the coordinator sends: its spent
epsilon never goes down, it refuses jobs past its budget or its own DP-SGD steps, and
its secure-aggregation client refuses thresholds and groups below its minimum cohort."""

import pytest
from conftest import tiny_config_dict
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.privacy.dp import InstitutionPrivacy, PrivacyBudgetSpent
from m3tfed.privacy.encoding import RingCodec
from m3tfed.privacy.policy import PolicyConfig, resolve_policy
from m3tfed.privacy.secagg import (
    CLIENT_METHODS,
    SecAggClient,
    SecAggServer,
    SecAggSettings,
    new_session,
)


def test_dp_sgd_refuses_a_job_with_more_steps_than_its_own_plan():
    # Hole: the budget check used the node's steps, but training ran the job's steps.
    pol = resolve_policy("a", PolicyConfig(dp="sample", epsilon=3.0, delta=1e-5))
    priv = InstitutionPrivacy(pol, rounds=4, seed=0, num_train=100, local_steps=2, batch_size=10)
    with pytest.raises(PrivacyBudgetSpent, match="asks for 50 DP-SGD steps, more than the 2"):
        priv.begin_round(1, steps=50)
    assert priv.epsilon() == 0.0 and "50 DP-SGD steps" in priv.report(1)["refused"]
    priv.begin_round(1, steps=2)  # its own plan is accepted and recorded as such
    assert priv.report(1)["releases"] == [
        {
            "mode": "sample",
            "noise_multiplier": priv.noise_multiplier,
            "clip_norm": 1.0,
            "sample_rate": 0.1,
            "steps": 2,
        }
    ]


def test_an_institution_refuses_a_job_that_asks_for_more_dp_sgd_steps():
    d = tiny_config_dict(rounds=1)
    d["institutions"][0]["policy"] = {"dp": "sample", "epsilon": 3.0}
    fed = build_federation(load_config(d))
    inst = fed.institutions["high_school"]
    job = fed.server.make_job("high_school", 1, 0)
    job.steps = 40 * inst.local_steps()
    with pytest.raises(PrivacyBudgetSpent, match="DP-SGD steps"):
        inst.train(job)
    assert inst.privacy.epsilon() == 0.0


class Net:
    def __init__(self, clients):
        self.clients = clients

    def __call__(self, name, kind, payload):
        return getattr(self.clients[name], CLIENT_METHODS[kind])(payload)


def settings():
    return SecAggSettings(mode="secagg", threshold=0.6, codec=RingCodec(scale_bits=24, clip=5.0))


def test_a_secagg_client_never_joins_a_group_of_one():
    # Hole: a group of one was summed and revealed (its "sum" is its update).
    clients = {"i00": SecAggClient("i00", settings())}
    excluded = SecAggServer(settings()).setup(
        new_session(1), 1, {"c": ["i00"]}, {"c": [("w", 4)]}, Net(clients)
    )
    assert "refuses" in excluded["c"]["i00"] and "never fewer than 2" in excluded["c"]["i00"]
    assert "c" in clients["i00"].refused and "c" not in clients["i00"].groups


def test_a_secagg_client_refuses_a_threshold_below_its_minimum_cohort():
    # Hole: clients accepted whatever threshold the server sent; with threshold t the
    # server can learn the sum of t members.
    names = ["a", "b", "c", "d", "e"]
    clients = {u: SecAggClient(u, settings()) for u in names}
    server = SecAggServer(settings())

    def lax(name, kind, payload):  # a server that asks for too little
        if kind == "secagg.share":
            for spec in payload["components"].values():
                spec["threshold"] = 1
        return Net(clients)(name, kind, payload)

    excluded = server.setup(new_session(1), 1, {"c": names}, {"c": [("w", 4)]}, lax)
    assert set(excluded["c"]) == set(names) and all(
        "threshold 1" in r for r in excluded["c"].values()
    )
    # threshold ceil(0.6 * 3) = 2 in a group of 3: the member whose policy asks 3 refuses
    clients = {u: SecAggClient(u, settings()) for u in names[:3]}
    clients["a"].min_cohort = lambda component: 3
    excluded = SecAggServer(settings()).setup(
        new_session(2), 2, {"c": names[:3]}, {"c": [("w", 4)]}, Net(clients)
    )
    assert set(excluded["c"]) == {"a"} and "requires at least 3" in excluded["c"]["a"]
    # its refusal survives a process that ends between protocol steps (a Flower node)
    again = SecAggClient.from_state_dict(clients["a"].state_dict(), settings())
    assert again.refused == clients["a"].refused


def test_in_a_federation_a_member_too_small_a_group_sends_nothing_for_it():
    # encoder.text has two holders (high_school, community_college); high_school's policy
    # asks for 3, so it does not join that sum and sends no update for it.
    d = tiny_config_dict(rounds=1)
    for i in range(6):
        d["institutions"][i]["policy"] = {"secure_aggregation": True}
    d["institutions"][0]["policy"]["min_cohort"] = {"encoder.text": 3}
    fed = build_federation(load_config(d))
    rep = fed.server.run_round(1)
    stage = next(s for s in fed.server.server_stages if type(s).__name__ == "SecureAggregation")
    excluded = stage.reports[-1]["excluded_at_setup"]
    assert "requires at least 3" in excluded["encoder.text"]["high_school"]
    assert "high_school" not in rep.contributors.get("encoder.text", [])
    assert "high_school" in rep.contributors["trunk"]  # its other components aggregate
