"""Differential privacy: clipping and noise scales, the Opacus accountant, DP-SGD on the MoE model."""

import math

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.federation.aggregation import AggregatedUpdate, Aggregator, ComponentUpdate
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.interfaces import RoundContext
from m3tfed.plugins.pipeline.privacy import CentralNoise, LocalPrivacy
from m3tfed.privacy.dp import (
    InstitutionPrivacy,
    central_noise_std,
    clip_update,
    epsilon_of,
    l2_norm,
    noise_multiplier_for,
)
from m3tfed.privacy.dpsgd import make_dp_optimizer, per_sample_grads
from m3tfed.privacy.policy import PolicyConfig, resolve_policy
from opacus.accountants import RDPAccountant


def test_clipping_bounds_the_norm_and_keeps_small_updates():
    big = {"a": torch.full((10,), 3.0), "b": torch.full((5, 2), -4.0)}
    clipped, norm = clip_update(big, 2.0)
    assert norm == pytest.approx(math.sqrt(10 * 9 + 10 * 16))
    assert l2_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(clipped["a"] / clipped["a"][0], torch.ones(10))  # direction kept
    small = {"a": torch.full((4,), 0.1)}
    assert torch.equal(clip_update(small, 2.0)[0]["a"], small["a"])


def test_local_noise_has_the_policy_scale():
    pol = resolve_policy(
        "a", PolicyConfig(dp="local", epsilon=50.0, noise_multiplier=0.7, clip_norm=0.5)
    )
    priv = InstitutionPrivacy(pol, rounds=5, seed=1)
    priv.begin_round(1)
    delta = {"w": torch.zeros(200_000)}
    out = LocalPrivacy().process(
        [ComponentUpdate("a", "trunk", delta, 1.0)], RoundContext(1, privacy=priv)
    )[0]
    assert out.delta["w"].std().item() == pytest.approx(0.7 * 0.5, rel=0.01)
    assert abs(out.delta["w"].mean().item()) < 0.01
    assert priv.report(1)["components"]["trunk"]["noise_multiplier"] == 0.7
    # central mode: the institution clips but leaves the noise to the server
    cpol = resolve_policy(
        "a", PolicyConfig(dp="central", epsilon=3.0, noise_multiplier=0.7, clip_norm=0.5)
    )
    cpriv = InstitutionPrivacy(cpol, rounds=5, seed=1)
    big = {"w": torch.ones(100)}
    got = LocalPrivacy().process(
        [ComponentUpdate("a", "trunk", big, 1.0)], RoundContext(1, privacy=cpriv)
    )[0]
    assert l2_norm(got.delta) == pytest.approx(0.5, rel=1e-6)


class FakeBackend:
    """What the central-noise stage asks a backend: who holds which component."""

    def __init__(self, holds: dict[str, list[str]]):
        self.holds = holds

    def components_of(self, name):
        return self.holds[name]

    def personal_of(self, name):
        return []


def fake_server(seed: int = 0):
    cfg = type("C", (), {"seed": seed, "aggregation": {}})()
    return type(
        "S", (), {"config": cfg, "versions": {}, "aggregator": lambda self, c: Aggregator()}
    )()


def central_context(sampled, info=None, **holds):
    backend = FakeBackend({n: holds.get(n, ["trunk"]) for n in sampled})
    return RoundContext(1, server=fake_server(), backend=backend, sampled=sampled, privacy=info)


def test_central_noise_has_a_fixed_denominator_so_one_institution_moves_the_estimate_by_at_most_c_over_d():
    # Hole: noise sigma*C*max(w)/sum(w) with sum(w) over who took part. Here the noise is
    # sigma*C/D with D the sampled holders, fixed before training: the same whoever replies.
    sigma, clip, n = 1.2, 0.8, 100_000
    info = {"trunk": {"central": (sigma, clip), "reproducible": False}}
    d = {"a": 0.3, "b": -0.2, "c": 0.5}
    updates = [
        ComponentUpdate(k, "trunk", {"w": torch.full((n,), v)}, w)
        for (k, v), w in zip(d.items(), (1.0, 1.0, 50.0))
    ]
    ctx = central_context(["a", "b", "c", "d"], info)  # d was sampled and dropped out
    out = CentralNoise().process(updates, ctx)
    assert (
        len(out) == 1
        and isinstance(out[0], AggregatedUpdate)
        and out[0].contributors == ["a", "b", "c"]
        and out[0].weight == 1.0
    )
    noisy = out[0].delta["w"]
    expected = sum(d.values()) / 4  # weights ignored: every contributor counts 1, divided by D = 4
    assert noisy.mean().item() == pytest.approx(expected, abs=0.01)
    assert (noisy - expected).std().item() == pytest.approx(sigma * clip / 4, rel=0.01)
    assert central_noise_std(sigma, clip, 4) == pytest.approx(sigma * clip / 4)
    # neighbouring federation: without c's update the noise scale is unchanged and the
    # estimate moves by c's update / D <= C / D, not by a data-dependent share
    ctx = central_context(["a", "b", "c", "d"], info)
    without = CentralNoise().process(updates[:2], ctx)[0].delta["w"]
    assert (without - (0.1 / 4)).std().item() == pytest.approx(sigma * clip / 4, rel=0.01)
    # components with no central contributor are left alone
    info["trunk"]["central"] = None
    assert CentralNoise().process(updates, central_context(["a", "b", "c"], info)) == updates


def test_central_noise_refuses_an_aggregator_that_is_not_a_weighted_mean():
    from m3tfed.errors import ConfigError
    from m3tfed.plugins.aggregators.robust import Median, TrimmedMean

    info = {"trunk": {"central": (1.0, 1.0), "reproducible": False}}
    ups = [ComponentUpdate(k, "trunk", {"w": torch.zeros(4)}, 1.0) for k in "abc"]
    for agg in (Median(), TrimmedMean(beta=0.2)):
        ctx = central_context(["a", "b", "c"], info)
        ctx["server"].aggregator = lambda c, agg=agg: agg
        with pytest.raises(ConfigError, match="weighted-mean aggregator"):
            CentralNoise().process(ups, ctx)


def test_accountant_charges_each_release_at_sample_rate_one_and_matches_opacus():
    # Hole: the accountant was given federation.fraction as the sampling rate and charged
    # every elapsed round, but sampling is from the public seed: no amplification holds.
    pol = resolve_policy(
        "a", PolicyConfig(dp="central", epsilon=8.0, delta=1e-5, noise_multiplier=3.0)
    )
    priv = InstitutionPrivacy(pol, rounds=10, seed=0)
    assert priv.sample_rate == 1.0
    eps = []
    for rnd in (1, 2, 4):  # rounds it was sampled in; a round sat out released nothing
        priv.begin_round(rnd)
        eps.append(priv.epsilon())
    direct = RDPAccountant()
    for _ in range(3):
        direct.step(noise_multiplier=3.0, sample_rate=1.0)
    assert eps == sorted(eps) and eps[0] < eps[-1]
    assert eps[-1] == pytest.approx(direct.get_epsilon(1e-5), rel=1e-9)
    assert priv.report(4)["epsilon_round"] == pytest.approx(eps[-1] - eps[-2])
    assert priv.report(4)["releases"] == [
        {
            "mode": "central",
            "noise_multiplier": 3.0,
            "clip_norm": 1.0,
            "sample_rate": 1.0,
            "steps": 1,
        }
    ]
    for rnd in range(5, 30):
        try:
            priv.begin_round(rnd)
        except RuntimeError as exc:
            assert "budget spent" in str(exc)
            break
    else:
        raise AssertionError("never refused")
    assert priv.epsilon() <= 8.0


def test_one_clip_over_all_components_so_m_components_are_one_release():
    # Hole: each component was clipped to C and noised on its own, so m components were
    # a Gaussian of multiplier sigma/sqrt(m) while the accountant charged sigma.
    pol = resolve_policy(
        "a", PolicyConfig(dp="local", epsilon=50.0, noise_multiplier=1.0, clip_norm=1.0)
    )
    priv = InstitutionPrivacy(pol, rounds=5, seed=0)
    priv.begin_round(1)
    comps = {f"expert.e{i}": {"w": torch.full((100,), 1.0)} for i in range(8)}
    ups = [ComponentUpdate("a", c, d, 1.0) for c, d in comps.items()]
    # central: clipped only, so the norm of the whole release is exactly C
    cpriv = InstitutionPrivacy(
        resolve_policy("a", PolicyConfig(dp="central", epsilon=8.0, noise_multiplier=1.0)),
        rounds=5,
        seed=0,
    )
    cpriv.begin_round(1)
    out = LocalPrivacy().process(ups, RoundContext(1, privacy=cpriv))
    joint = l2_norm({u.component + "/w": u.delta["w"] for u in out})
    assert joint == pytest.approx(1.0, rel=1e-6)  # not sqrt(8)
    # every component shrinks by the same factor: the direction of the release is kept
    assert all(torch.allclose(u.delta["w"], torch.full((100,), 1.0 / math.sqrt(800))) for u in out)
    # local: noise std sigma*C per coordinate on every component; one release charged
    out = LocalPrivacy().process(ups, RoundContext(1, privacy=priv))
    assert all(u.weight == 1.0 for u in out)
    assert priv.accountant.history == [(1.0, 1.0, 1)]
    assert [u.component for u in out] == list(comps)


def test_noise_multiplier_derived_from_the_budget_spends_it_over_the_planned_rounds():
    pol = resolve_policy("a", PolicyConfig(dp="local", epsilon=4.0, delta=1e-5))
    priv = InstitutionPrivacy(pol, rounds=12, seed=0)
    assert priv.noise_multiplier == pytest.approx(noise_multiplier_for(4.0, 1e-5, 1.0, 12))
    for rnd in range(1, 13):
        priv.begin_round(rnd)
    assert 4.0 * 0.97 < priv.epsilon() <= 4.0 * 1.001
    with pytest.raises(RuntimeError, match="budget spent"):
        priv.begin_round(13)


def test_dp_optimizer_clips_each_sample():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(6, 3) * 10, torch.randn(6, 1)
    batch = {"x": x, "targets": {"y": y}}
    params = list(model.parameters())
    grads = per_sample_grads(
        lambda one: ((model(one["x"]) - one["targets"]["y"]) ** 2).mean(), batch, params
    )
    for i in range(6):  # equals the gradient of each sample alone
        model.zero_grad()
        ((model(x[i : i + 1]) - y[i : i + 1]) ** 2).mean().backward()
        assert torch.allclose(grads[0][i], model.weight.grad)
    opt = make_dp_optimizer(
        torch.optim.SGD(params, lr=1.0),
        noise_multiplier=0.0,
        clip_norm=0.1,
        expected_batch_size=6,
        accountant=RDPAccountant(),
        sample_rate=0.5,
    )
    for p, g in zip(params, grads):
        p.grad_sample = g
    opt.pre_step()
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads))
    clipped = sum(
        g * torch.clamp(0.1 / (norms + 1e-6), max=1.0).view(-1, *[1] * (g.dim() - 1))
        for g in grads[:1]
    )
    assert torch.allclose(params[0].grad, clipped.sum(0) / 6, atol=1e-6)
    assert float(torch.sqrt(sum(p.grad.pow(2).sum() for p in params))) <= 0.1 + 1e-6


def test_dp_sgd_trains_the_moe_model_and_reports_epsilon():
    d = tiny_config_dict(rounds=1, n=75)  # 45 training samples (60/20/20 split)
    d["federation"].update({"batch_size": 8, "lr": 2e-2})
    # an explicit sigma: deriving one for a sample rate < 1 takes Opacus seconds
    d["institutions"][0]["policy"] = {
        "dp": "sample",
        "epsilon": 50.0,
        "noise_multiplier": 0.3,
        "clip_norm": 1.0,
        "reproducible_noise": True,
    }  # deterministic test
    fed = build_federation(load_config(d))
    inst = fed.institutions["high_school"]
    priv = inst.privacy
    assert priv.sample_rate == pytest.approx(8 / inst.data.num_train)
    model = inst.load(fed.server.state)

    def loss_now():
        return sum(float(inst.evaluate(model, "train")[0][t]["loss"]) for t in inst.config.tasks)

    start = loss_now()
    priv.begin_round(1)
    loss, tokens = inst.fit(model, 20, 5e-3, seed=0)
    assert priv.report(1)["epsilon_total"] > 0 and priv.report(1)["epsilon_round"] > 0
    assert tokens and sum(tokens.values()) > 0  # the experts were used under per-sample gradients
    assert loss_now() < start  # training still works under clipping + noise
    assert priv.accountant.history[-1][2] == 20  # one accountant step per optimizer step


def local_noise(priv: InstitutionPrivacy, rnd: int = 1) -> torch.Tensor:
    """The local noise ``priv`` adds to a zero update of the trunk in ``rnd``."""
    return priv.privatize(rnd, {"trunk": {"w": torch.zeros(1000)}})["trunk"]["w"]


def test_noise_is_secret_unless_the_policy_opts_in_to_reproducible_noise():
    # The server knows the seed every InstitutionPrivacy is built with (it derives from the
    # run seed): by default the noise must not follow from it.
    secret = resolve_policy("a", PolicyConfig(dp="local", epsilon=50.0, noise_multiplier=1.0))
    a, b = InstitutionPrivacy(secret, 5, seed=7), InstitutionPrivacy(secret, 5, seed=7)
    a.begin_round(1), b.begin_round(1)
    assert not torch.allclose(local_noise(a), local_noise(b))
    testing = resolve_policy(
        "a", PolicyConfig(dp="local", epsilon=50.0, noise_multiplier=1.0, reproducible_noise=True)
    )
    a, b = InstitutionPrivacy(testing, 5, seed=7), InstitutionPrivacy(testing, 5, seed=7)
    a.begin_round(1), b.begin_round(1)
    assert torch.equal(local_noise(a), local_noise(b))
    # central noise: secret by default, from the run seed only when asked
    ups = [ComponentUpdate(n, "trunk", {"w": torch.zeros(1000)}, 1.0) for n in "ab"]
    draw = lambda stage: stage.process(ups, central_context(["a", "b"]))[0].delta["w"]  # noqa: E731
    assert not torch.allclose(
        draw(CentralNoise(noise_multiplier=1.0)), draw(CentralNoise(noise_multiplier=1.0))
    )
    assert torch.equal(
        draw(CentralNoise(1.0, reproducible_noise=True)),
        draw(CentralNoise(1.0, reproducible_noise=True)),
    )


def test_reproducible_noise_does_not_depend_on_the_order_of_the_keys():
    # A checkpoint restores a component's keys in its own order: a resumed run must draw
    # the same noise for the same update as the uninterrupted run.
    gen = torch.Generator().manual_seed(0)
    items = [
        (k, torch.randn(shape, generator=gen))
        for k, shape in (("weight", (6, 4)), ("bias", (6,)), ("norm.scale", (4,)))
    ]
    forward, backward = dict(items), dict(reversed(items))
    assert list(forward) != list(backward)
    # local noise (and clipping: the update's norm is above the policy's 1.0)
    pol = resolve_policy(
        "a", PolicyConfig(dp="local", epsilon=50.0, noise_multiplier=1.0, reproducible_noise=True)
    )
    outs = []
    for delta in (forward, backward):
        priv = InstitutionPrivacy(pol, 5, seed=7)
        priv.begin_round(1)
        outs.append(priv.privatize(1, {"trunk": delta})["trunk"])
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in forward)
    assert l2_norm(forward) > 1.0 and not torch.equal(
        outs[0]["bias"], clip_update(forward, 1.0)[0]["bias"]
    )  # noised
    # central noise, on a plain update and on a securely aggregated one

    def central(delta, aggregated):
        zeros = {k: torch.zeros_like(v) for k, v in delta.items()}
        if aggregated:  # sigma and C from the policy stage's decision
            info = {"trunk": {"central": (1.0, 1.0), "reproducible": True}}
            u = AggregatedUpdate("secagg[3]", "trunk", zeros, 3.0, 0, ["a", "b", "c"])
            return CentralNoise().process([u], central_context(["a", "b", "c"], info))[0].delta
        u = ComponentUpdate("a", "trunk", zeros, 1.0)
        return (
            CentralNoise(1.0, reproducible_noise=True).process([u], central_context(["a"]))[0].delta
        )

    for aggregated in (False, True):
        a, b = central(forward, aggregated), central(backward, aggregated)
        assert all(torch.equal(a[k], b[k]) for k in forward) and a["weight"].abs().sum() > 0


def test_privacy_report_says_nothing_computed_from_the_update():
    # An update's norm before clipping is un-noised: it must not reach the server.
    pol = resolve_policy("a", PolicyConfig(dp="central", epsilon=8.0, noise_multiplier=1.0))
    reports = []
    for scale in (1e-3, 1e3):
        priv = InstitutionPrivacy(pol, 5, seed=0)
        priv.begin_round(1)
        priv.privatize(1, {"trunk": {"w": torch.full((10,), scale)}})
        reports.append(priv.report(1))
    assert reports[0] == reports[1]
    assert reports[0]["components"]["trunk"] == {
        "mode": "central",
        "clip_norm": 1.0,
        "noise_multiplier": 1.0,
    }


def test_every_training_attempt_is_charged_and_draws_fresh_noise():
    pol = resolve_policy(
        "a", PolicyConfig(dp="local", epsilon=50.0, noise_multiplier=1.0, reproducible_noise=True)
    )
    priv = InstitutionPrivacy(pol, rounds=10, seed=3)
    priv.begin_round(1)
    first = local_noise(priv)
    once = priv.epsilon()
    assert once == pytest.approx(epsilon_of([(1.0, 1.0, 1)], 1e-5))
    priv.begin_round(1)  # the server retried round 1: a second release
    assert not torch.allclose(first, local_noise(priv))  # even reproducible noise is not reused
    # two Gaussian releases = one of sigma / sqrt(2)
    assert priv.epsilon() == pytest.approx(epsilon_of([(1 / math.sqrt(2), 1.0, 1)], 1e-5), rel=1e-6)
    assert priv.report(1)["attempts"] == 2 and len(priv.report(1)["releases"]) == 2
    priv.begin_round(3)  # round 2 sat out: nothing released, nothing charged
    assert priv.accountant.history == [(1.0, 1.0, 3)]
    with pytest.raises(ValueError, match="already charged round 3"):
        priv.begin_round(2)


def test_a_node_never_takes_an_accountant_that_lowers_its_epsilon():
    # Hole: a resumed coordinator handed a node an empty accountant; the node took it
    # (epsilon 7.59 -> 0) and trained past its budget.
    pol = resolve_policy("a", PolicyConfig(dp="central", epsilon=8.0, noise_multiplier=3.0))
    priv = InstitutionPrivacy(pol, rounds=10, seed=0)
    for rnd in (1, 2, 3):
        priv.begin_round(rnd)
    spent = priv.epsilon()
    assert not priv.restore([], 3)
    assert priv.epsilon() == spent and priv.accounted_round == 3
    assert not priv.restore([(3.0, 1.0, 1)], 5)
    assert priv.epsilon() == spent
    # a record that accounts at least as much (its own state was lost) is taken
    assert priv.restore([(3.0, 1.0, 4)], 4) and priv.epsilon() > spent and priv.accounted_round == 4


def test_central_noise_on_a_securely_aggregated_update_uses_the_fixed_denominator():
    sigma, clip = 1.2, 0.8
    # what secure aggregation hands over: one mean of three institutions of weight 1 each
    agg = AggregatedUpdate(
        "secagg[3]", "trunk", {"w": torch.full((100_000,), 0.1)}, 3.0, 0, ["a", "b", "c"]
    )
    info = {"trunk": {"central": (sigma, clip), "reproducible": False}}
    out = CentralNoise().process([agg], central_context(["a", "b", "c", "d", "e"], info))
    assert isinstance(out[0], AggregatedUpdate) and out[0].contributors == ["a", "b", "c"]
    assert out[0].delta["w"].mean().item() == pytest.approx(0.3 / 5, abs=0.01)  # sum / D
    assert out[0].delta["w"].std().item() == pytest.approx(sigma * clip / 5, rel=0.01)
    # without policies the stage would clip the aggregate, not each update: refused
    with pytest.raises(ValueError, match="cannot be clipped here"):
        CentralNoise(noise_multiplier=1.0).process([agg], central_context(["a", "b", "c"]))


def test_dp_sgd_noise_and_sampling_do_not_follow_the_servers_job_seed():
    def two_fits(policy):
        d = tiny_config_dict(rounds=1)
        d["institutions"][0]["policy"] = policy
        fed = build_federation(load_config(d))
        inst, out = fed.institutions["high_school"], []
        for _ in range(2):  # the same job (same seed) from the same state, twice
            model = inst.load(fed.server.state)
            inst.privacy.begin_round(1)
            inst.fit(model, 2, 1e-1, seed=0)
            out.append(torch.cat([v.flatten() for v in model.component_state("trunk").values()]))
        return out

    pol = {"dp": "sample", "epsilon": 50.0, "noise_multiplier": 1.0}
    a, b = two_fits(pol)
    assert not torch.allclose(a, b)
    a, b = two_fits({**pol, "reproducible_noise": True})
    assert torch.equal(a, b)
