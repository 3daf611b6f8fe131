"""Secure aggregation: Shamir sharing, the fixed-point ring, the protocol, the stage."""

import itertools
import os

import numpy as np
import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.errors import ConfigError
from m3tfed.federation.build import build_federation, privacy_ledger
from m3tfed.federation.config import load_config
from m3tfed.plugins.pipeline.secagg import MASKED_KEY
from m3tfed.privacy import shamir
from m3tfed.privacy.encoding import RingCodec
from m3tfed.privacy.secagg import (
    CLIENT_METHODS,
    SecAggClient,
    SecAggError,
    SecAggMessageError,
    SecAggServer,
    SecAggSettings,
    new_session,
)


# -- Shamir ------------------------------------------------------------------------------
def test_shamir_any_threshold_subset_rebuilds_and_fewer_shares_fit_any_secret():
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5, 6, 7], threshold=4)
    for subset in itertools.combinations(shares.items(), 4):
        assert shamir.combine(subset, 32) == secret
    assert shamir.combine(shares.items(), 32) == secret  # more consistent shares also work
    # 3 shares say nothing: with (0, other) they lie on a degree-3 polynomial whose
    # constant term is any other secret, so every secret is consistent with them.
    other = os.urandom(32)
    three = list(shares.items())[:3]
    points = [*three, (0, int.from_bytes(other, "big"))]
    x_new = 9
    y_new = 0
    for i, (xi, yi) in enumerate(points):  # Lagrange evaluation at x_new
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num, den = num * (x_new - xj) % shamir.PRIME, den * (xi - xj) % shamir.PRIME
        y_new = (y_new + yi * num * pow(den, -1, shamir.PRIME)) % shamir.PRIME
    assert shamir.combine([*three, (x_new, y_new)], 32) == other
    with pytest.raises(ValueError, match="threshold 8"):
        shamir.split(secret, [1, 2, 3], threshold=8)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(secret, [1, 1, 2], threshold=2)
    with pytest.raises(ValueError, match="66 bytes"):
        shamir.share_from_bytes(b"short")


# -- the ring ------------------------------------------------------------------------------
def test_fixed_point_sum_error_is_within_the_bound_and_overflow_is_refused():
    codec = RingCodec(bits=64, scale_bits=20, clip=2.0, max_weight=100.0)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(500, generator=gen, dtype=torch.float64) for _ in range(8)]
    ws = [1.0, 3.5, 7.0, 0.0, 12.25, 50.0, 2.0, 99.0]
    total = np.zeros(501, dtype=np.uint64)
    clamped = 0
    for x, w in zip(xs, ws):
        y, c = codec.encode(x, w, 501)
        total += y
        clamped += c
    values, weight = codec.decode(total)
    plain = sum(w * x.clamp(-2, 2) for x, w in zip(xs, ws))
    assert clamped == sum(int((x.abs() > 2).sum()) for x in xs) > 0
    assert float((values - plain).abs().max()) <= codec.error_bound(8)
    assert abs(weight - sum(ws)) <= codec.error_bound(1)
    # the bound is real: a 32-bit ring of scale 2^16 holds 32767 contributors of 1.0
    small = RingCodec(bits=32, scale_bits=16, clip=1.0, max_weight=1.0)
    assert small.capacity() == 32767
    one, _ = small.encode(torch.ones(1), 1.0, 2)
    assert small.decode(one * np.uint32(32767))[0].item() == 32767.0
    assert small.decode(one * np.uint32(32768))[0].item() == -32768.0  # wrapped
    with pytest.raises(ConfigError, match="overflow the ring"):
        small.check_capacity(32768)
    with pytest.raises(ValueError, match="max_weight"):
        small.encode(torch.ones(1), 2.0, 2)
    with pytest.raises(ConfigError, match="bits"):
        RingCodec(bits=48)


# -- the protocol ------------------------------------------------------------------------
class Net:
    """In-memory transport; ``down`` institutions raise (dropped out after masking)."""

    def __init__(self, clients, tamper=None):
        self.clients, self.tamper, self.down = clients, tamper, set()

    def __call__(self, name, kind, payload):
        if name in self.down:
            raise ConnectionError(f"{name} is offline")
        reply = getattr(self.clients[name], CLIENT_METHODS[kind])(payload)
        return self.tamper(name, kind, reply) if self.tamper else reply


def protocol(
    n=10, length=300, mode="secagg", degree=None, drop=(), tamper=None, weights=None, seed=0
):
    """Set up, mask ``n`` random updates, drop ``drop`` after masking, unmask.
    Returns (result, plain weighted sum of the survivors, their weight, settings, extras)."""
    settings = SecAggSettings(
        mode=mode, threshold=0.6, degree=degree, codec=RingCodec(scale_bits=24, clip=5.0)
    )
    names = [f"i{k:02d}" for k in range(n)]
    clients = {u: SecAggClient(u, settings) for u in names}
    net = Net(clients, tamper)
    server = SecAggServer(settings)
    excluded = server.setup(new_session(1), 1, {"c": names}, {"c": [("w", length)]}, net, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    xs = {u: torch.randn(length, generator=gen) for u in names}
    weights = weights or {u: float(k + 1) for k, u in enumerate(names)}
    masked = {
        u: server.check_vector("c", u, clients[u].mask("c", xs[u], weights[u]))
        for u in names
        if u not in drop
    }
    net.down = set(drop)
    result = server.finish({"c": masked}, net)["c"]
    alive = [u for u in names if u not in drop and u not in excluded.get("c", {})]
    plain = sum(weights[u] * xs[u].double() for u in alive)
    return (
        result,
        plain,
        sum(weights[u] for u in alive),
        settings,
        {"server": server, "clients": clients, "xs": xs, "masked": masked, "excluded": excluded},
    )


@pytest.mark.parametrize(
    "mode, degree, drop",
    [
        ("secagg", None, ()),
        ("secagg", None, ("i01", "i04", "i07", "i09")),  # t = 6 of 10: four may drop
        ("secagg+", 4, ()),
        ("secagg+", 4, ("i02", "i05")),  # t = 3 of 5 holders: any two may drop
    ],
)
def test_unmasked_sum_equals_the_plain_weighted_sum(mode, degree, drop):
    result, plain, weight, settings, ex = protocol(mode=mode, degree=degree, drop=drop)
    assert sorted(result.dropped) == sorted(drop) and len(result.survivors) == 10 - len(drop)
    assert float((result.weighted_sum - plain).abs().max()) <= settings.codec.error_bound(10)
    assert abs(result.total_weight - weight) < 1e-6
    graph = ex["server"].groups["c"].graph
    assert all(
        len(v) == (9 if mode == "secagg" else 4) for v in graph.values()
    )  # sparse for SecAgg+


def test_masked_vector_is_uniform_on_the_ring_whatever_the_plaintext():
    """The server's view of institution A's update is its masked vector
    y_A = x_A + PRG(b_A) + sum_v +-PRG(s_Av) (mod 2^64). The server never holds b_A (a
    survivor's holders reveal only its b shares, never both b and s: checked below), so
    PRG(b_A), an AES-CTR keystream under a fresh random key, is a one-time pad: y_A is
    uniform on the ring and independent of x_A, even if the server knew every pairwise
    mask. Given everything it saw, any plaintext x' is consistent with y_A (the pad
    y_A - x' - pairwise is as likely as the real one); only the sum is pinned down.
    Numerically: same distribution for a zero and a huge plaintext, correlation ~ 0."""
    length = 20000
    settings = SecAggSettings(mode="secagg", codec=RingCodec(scale_bits=24, clip=10.0))
    views = {}
    for label, x in (("zero", torch.zeros(length)), ("big", torch.full((length,), 9.5))):
        clients = {u: SecAggClient(u, settings) for u in ("a", "b", "c")}
        server = SecAggServer(settings)
        server.setup(
            new_session(1), 1, {"comp": list(clients)}, {"comp": [("w", length)]}, Net(clients)
        )
        views[label] = (clients["a"].mask("comp", x, 1000.0)[:-1], x)
    for label, (y, _) in views.items():
        top = (y >> np.uint64(56)).astype(np.int64)  # the top byte of each ring element
        counts = np.bincount(top, minlength=256)
        chi2 = float(((counts - length / 256) ** 2 / (length / 256)).sum())
        assert chi2 < 400, f"{label}: masked vector is not uniform (chi2 {chi2:.0f}, 255 dof)"
        assert abs(float((y / 2.0**64).mean()) - 0.5) < 0.01
    y_zero, y_big = (views[k][0] / 2.0**64 for k in ("zero", "big"))
    assert abs(np.corrcoef(y_zero, y_big)[0, 1]) < 0.05  # two plaintexts, unrelated views
    x_rand = torch.randn(length).numpy()
    clients = {u: SecAggClient(u, settings) for u in ("a", "b")}
    SecAggServer(settings).setup(
        new_session(2), 2, {"comp": ["a", "b"]}, {"comp": [("w", length)]}, Net(clients)
    )
    y = clients["a"].mask("comp", torch.from_numpy(x_rand), 1000.0)[:-1] / 2.0**64
    assert abs(np.corrcoef(y, x_rand)[0, 1]) < 0.05


def test_an_institution_never_reveals_both_secrets_of_a_member_or_answers_twice():
    _, _, _, _, ex = protocol(n=4, length=10)  # finish() already asked each survivor once
    client = ex["clients"]["i00"]
    session = ex["server"].session
    with pytest.raises(SecAggMessageError, match="already answered"):
        client.unmask(
            {
                "session": session,
                "components": {"c": {"survivors": ["i00", "i01", "i02"], "dropped": ["i03"]}},
            }
        )
    _, _, _, _, ex = protocol(n=4, length=10)
    fresh = SecAggClient("x", ex["clients"]["i00"].settings)
    with pytest.raises(SecAggMessageError, match="current session"):
        fresh.unmask(
            {
                "session": ex["server"].session,
                "components": {"c": {"survivors": ["x"], "dropped": []}},
            }
        )
    # a new session for i00, then a request listing one member in both sets is refused
    settings = SecAggSettings(mode="secagg")
    clients = {u: SecAggClient(u, settings) for u in ("a", "b", "c")}
    server = SecAggServer(settings)
    server.setup(new_session(3), 3, {"k": list(clients)}, {"k": [("w", 4)]}, Net(clients))
    with pytest.raises(SecAggMessageError, match="both as survivors and dropped"):
        clients["a"].unmask(
            {
                "session": server.session,
                "components": {"k": {"survivors": ["a", "b"], "dropped": ["b"]}},
            }
        )


def test_too_many_dropouts_hold_the_component_with_a_clear_reason_and_ask_no_shares():
    asked = []

    def spy(name, kind, reply):
        asked.append(kind)
        return reply

    drop = ("i00", "i01", "i02", "i03", "i04")  # 5 of 10, t = 6
    res, _, _, _, ex = protocol(mode="secagg", drop=drop, tamper=spy)
    assert "too many dropouts" in res.held and res.total_weight == 0.0 and res.weighted_sum.numel() == 0
    assert sorted(res.dropped) == list(drop) and len(res.survivors) == 5
    assert "secagg.unmask" not in asked  # a sum that cannot be unmasked reveals no share
    assert not any(g.answered for c in ex["clients"].values() for g in c.groups.values())
    # SecAgg+: three dropouts around one member leave it fewer than t = 3 holders
    _, _, _, _, ex = protocol(mode="secagg+", degree=4)
    graph = ex["server"].groups["c"].graph
    u = "i00"
    res, _, _, _, _ = protocol(mode="secagg+", degree=4, drop=(u, *graph[u][:2]))
    assert "too many dropouts" in res.held


def test_a_malformed_vector_or_share_excludes_the_institution_with_the_reason():
    # malformed vector: refused, the institution is excluded and its masks removed as a dropout's
    settings = SecAggSettings(mode="secagg")
    names = ["a", "b", "c", "d"]
    clients = {u: SecAggClient(u, settings) for u in names}
    server = SecAggServer(settings)
    server.setup(new_session(1), 1, {"k": names}, {"k": [("w", 50)]}, Net(clients))
    xs = {u: torch.full((50,), float(i + 1)) for i, u in enumerate(names)}
    masked = {}
    for u in names:
        y = clients[u].mask("k", xs[u], 1.0)
        vec = y[:-3] if u == "d" else y
        try:
            masked[u] = server.check_vector("k", u, vec)
        except SecAggMessageError as exc:
            assert "has 48 elements, expected 51" in str(exc)
            server.exclude("k", u, str(exc))
    with pytest.raises(SecAggMessageError, match="dtype"):
        server.check_vector("k", "a", torch.zeros(51, dtype=torch.float32))
    res = server.finish({"k": masked}, Net(clients))["k"]
    assert res.survivors == ["a", "b", "c"] and "48 elements" in res.dropped["d"]
    assert torch.allclose(res.weighted_sum, torch.full((50,), 6.0, dtype=torch.float64), atol=1e-6)

    # a share that does not verify (tampered ciphertext): its sender is excluded, with the reason
    def tamper(name, kind, reply):
        if kind == "secagg.share" and name == "i03":
            ct = bytearray(reply["components"]["c"]["shares"]["i05"])
            ct[-1] ^= 1
            reply["components"]["c"]["shares"]["i05"] = bytes(ct)
        return reply

    res, plain, weight, settings, ex = protocol(n=8, tamper=tamper)
    assert "i03" not in res.survivors and "did not verify" in res.dropped["i03"]
    assert float((res.weighted_sum - plain).abs().max()) <= settings.codec.error_bound(8)

    # a share addressed to another institution (swapped ciphertexts) fails the same way
    def swap(name, kind, reply):
        if kind == "secagg.share" and name == "i02":
            s = reply["components"]["c"]["shares"]
            s["i04"], s["i06"] = s["i06"], s["i04"]
        return reply

    res, plain, _, settings, _ = protocol(n=8, tamper=swap)
    assert "i02" in res.dropped and "does not decrypt" in res.dropped["i02"]
    assert float((res.weighted_sum - plain).abs().max()) <= settings.codec.error_bound(8)


# -- the pipeline stage in a federation -------------------------------------------------------
def max_state_difference(a, b):
    return max(
        float((a[c][k] - b[c][k]).abs().max())
        for c in a
        for k in a[c]
        if a[c][k].is_floating_point()
    )


def test_secagg_federation_matches_the_plain_run_and_only_masked_vectors_go_up():
    # SGD, so a 1e-7 difference stays 1e-7 (Adam can magnify it where gradients are ~0)
    # a masked sum cannot tell which institution changed which row, so the sum is averaged
    # as a whole: the plain run compares with changed-row averaging off
    plain_cfg = tiny_config_dict(optimizer="sgd", lr=0.05)
    plain_cfg["aggregation"] = {"default": {"plugin": "fedavg", "options": {"changed_rows": []}}}
    plain = build_federation(load_config(plain_cfg))
    secure = build_federation(
        load_config(tiny_config_dict(optimizer="sgd", lr=0.05, pipeline=[{"plugin": "secagg"}]))
    )
    sent = []
    train = secure.server.backend.train

    def spy(jobs):
        results = train(jobs)
        sent.extend(u for r in results for u in r.updates)
        return results

    secure.server.backend.train = spy
    backend = secure.server.backend
    holders = {
        c: [n for n in secure.institutions if c in backend.components_of(n) and c not in backend.personal_of(n)]
        for c in plain.server.state
    }
    # a "sum" of one member is that member's update: its clients refuse to join such a group
    alone = {c for c, h in holders.items() if len(h) == 1}
    assert alone
    shared = lambda server: {c: s for c, s in server.state.items() if c not in alone}  # noqa: E731
    for rnd in (1, 2):
        a, b = plain.server.run_round(rnd), secure.server.run_round(rnd)
        assert a.contributors.keys() - alone <= b.contributors.keys() and not b.contributors.keys() & alone
        for comp, names in a.contributors.items():
            if comp not in alone:
                assert set(names) <= set(b.contributors[comp])  # + weight-0 members of the mask graph
        if rnd == 1:  # from round 2 on the members of a group of one train from a different state
            assert max_state_difference(shared(plain.server), shared(secure.server)) < 1e-5
    moved = [c for c in plain.server.state if plain.server.versions[c]]
    assert moved and all(
        secure.server.versions[c] == (0 if c in alone else plain.server.versions[c]) for c in plain.server.state
    )
    # what went up: one int64 ring vector per component, weight hidden, never a float delta
    stage = secure.server.server_stages[0]
    assert sent and all(
        set(u.delta) == {MASKED_KEY}
        and u.delta[MASKED_KEY].dtype == torch.int64
        and u.weight == 0.0
        for u in sent
    )
    for u in sent:
        assert u.delta[MASKED_KEY].numel() == sum(n for _, n in stage.layouts[u.component]) + 1
    ups = [e for e in secure.server.backend.transcript if e["direction"] == "up"]
    assert {e["institution"] for e in ups} == set(secure.institutions)
    asks = {
        e["direction"]
        for e in secure.server.backend.transcript
        if e["direction"].startswith("ask:")
    }
    assert asks == {
        "ask:secagg.advertise",
        "ask:secagg.share",
        "ask:secagg.deliver",
        "ask:secagg.unmask",
    }
    rep = stage.reports[-1]["components"]["trunk"]
    assert rep["aggregated"] and len(rep["survivors"]) == 6 and rep["total_weight"] > 0


def test_a_malformed_masked_update_is_excluded_with_the_reason_in_a_round():
    fed = build_federation(
        load_config(
            tiny_config_dict(
                rounds=1,
                pipeline=[{"plugin": "secagg", "options": {"mode": "secagg", "threshold": 0.51}}],
            )
        )
    )
    stage = fed.server.server_stages[0]
    mask = stage.mask

    def bad_router(updates, name, rnd):
        out = mask(updates, name, rnd)
        if name == "rural_school":
            for u in out:
                if u.component == "router":
                    u.delta = {MASKED_KEY: u.delta[MASKED_KEY][:-5]}
        return out

    stage.mask = bad_router
    report = fed.server.run_round(1)
    assert (
        "rural_school" not in report.contributors["router"]
        and len(report.contributors["router"]) == 5
    )
    rep = stage.reports[-1]["components"]["router"]
    assert "expected" in rep["dropped"]["rural_school"] and "rural_school" in rep["refused"]
    assert "rural_school" in report.contributors["trunk"]  # excluded from that component only


@pytest.mark.parametrize("policies", [False, True], ids=["stage-only", "with-ledger"])
def test_a_dropout_below_the_threshold_holds_only_that_component(policies, caplog):
    # expert.small_0's group is online_tutor and rural_school (t = 2 of 2). rural_school
    # masks its updates, then dies before they arrive: the survivor's sum alone cannot be
    # unmasked (it would be online_tutor's own update), so expert.small_0 is held for the
    # round with the reason, and every other component still aggregates.
    d = tiny_config_dict(rounds=1) if policies else tiny_config_dict(rounds=1, pipeline=[{"plugin": "secagg"}])
    if policies:  # the policy stage keeps a ledger; secure aggregation comes with the policy
        for inst in d["institutions"]:
            inst["policy"] = {"secure_aggregation": True}
    fed = build_federation(load_config(d))
    stage = next(s for s in fed.server.server_stages if getattr(s, "name", None) == "secagg")
    rural = fed.institutions["rural_school"]
    train = rural.train

    def dies_after_masking(job):
        train(job)  # trained and masked: its neighbours' masks include it
        raise ConnectionError("rural_school went offline")

    rural.train = dies_after_masking
    before = {k: v.clone() for k, v in fed.server.state["expert.small_0"].items()}
    report = fed.server.run_round(1)  # the round completes

    assert "rural_school" in report.dropped and "expert.small_0" not in report.contributors
    assert fed.server.versions["expert.small_0"] == 0
    assert all(torch.equal(fed.server.state["expert.small_0"][k], v) for k, v in before.items())
    rep = stage.reports[-1]["components"]["expert.small_0"]
    assert rep["aggregated"] is False and rep["survivors"] == ["online_tutor"]
    assert "too many dropouts" in rep["held"] and "held at its current state" in rep["held"]
    assert "no masked update arrived" in rep["dropped"]["rural_school"]
    assert any("expert.small_0" in r.message and "held" in r.message for r in caplog.records)
    # the other components aggregate as usual, without rural_school
    five = ["community_college", "high_school", "math_academy", "online_tutor", "university"]
    assert report.contributors["trunk"] == five and fed.server.versions["trunk"] == 1
    assert stage.reports[-1]["components"]["trunk"]["aggregated"] is True
    assert "router" in report.contributors and "expert.small_1" not in report.contributors
    if policies:
        ledger = privacy_ledger(fed).to_dict()
        small = ledger["components"]["1"]["expert.small_0"]
        assert small["rule"] == "secure_aggregation" and not small["aggregated"]
        assert "too many dropouts" in small["reason"] and small["contributors"] == ["online_tutor"]
        ot = ledger["institutions"]["online_tutor"]["1"]
        # besides the components only it holds (a group of one: it does not join)
        alone = [h for h in ot["held"] if "never fewer than 2" in h["reason"]]
        assert [(h["component"], h["rule"]) for h in ot["held"] if h not in alone] == [("expert.small_0", "secure_aggregation")]
        assert alone and all(h["rule"] == "secure_aggregation" and "among 1 holders" in h["reason"] for h in alone)
        assert "expert.small_0" not in ot["contributed"] and "trunk" in ot["contributed"]
        assert ledger["components"]["1"]["trunk"]["aggregated"]


def test_config_errors_are_clear():
    with pytest.raises(ConfigError, match="secagg.mode"):
        build_federation(
            load_config(
                tiny_config_dict(pipeline=[{"plugin": "secagg", "options": {"mode": "fast"}}])
            )
        )
    with pytest.raises(ConfigError, match="secagg.threshold"):
        build_federation(
            load_config(
                tiny_config_dict(pipeline=[{"plugin": "secagg", "options": {"threshold": 0.4}}])
            )
        )
    fed = build_federation(
        load_config(tiny_config_dict(pipeline=[{"plugin": "secagg", "options": {"bits": 32}}]))
    )
    with pytest.raises(ConfigError, match="overflow the ring"):
        fed.server.run_round(1)
    d = tiny_config_dict(pipeline=[{"plugin": "secagg"}])
    d["aggregation"] = {"default": {"plugin": "fedavg"}, "expert": {"plugin": "median"}}
    with pytest.raises(ConfigError, match="aggregation.expert.plugin"):
        build_federation(load_config(d)).server.run_round(1)
    fed = build_federation(
        load_config(tiny_config_dict(pipeline=[{"plugin": "secagg"}, {"plugin": "fp16"}]))
    )
    with pytest.raises(SecAggError, match="HalfPrecision runs after secure aggregation"):
        fed.server.run_round(1)


def test_a_wrong_share_in_an_unmask_reply_is_caught_by_the_commitment_and_worked_around():
    def corrupt(name, kind, reply):
        if kind == "secagg.unmask" and name == "i00":
            for u, (x, y) in reply["components"]["c"]["b"].items():
                reply["components"]["c"]["b"][u] = [
                    x,
                    shamir.share_to_bytes((shamir.share_from_bytes(y) + 1) % shamir.PRIME),
                ]
        if kind == "secagg.unmask" and name == "i01":
            reply["components"]["c"]["b"] = "garbage"
        return reply

    res, plain, weight, settings, _ = protocol(n=7, tamper=corrupt)  # t = 5 of 7 holders
    assert len(res.survivors) == 7
    assert float((res.weighted_sum - plain).abs().max()) <= settings.codec.error_bound(7)
    # with fewer good shares than the threshold the component is held, never a wrong sum
    res, _, _, _, _ = protocol(n=4, tamper=corrupt)  # t = 3 of 4: i00 wrong, i01 unreadable, 2 good
    assert "shares of" in res.held and res.total_weight == 0.0
