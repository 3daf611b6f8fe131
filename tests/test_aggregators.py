"""Aggregators on hand-computed cases: every number below is worked out in the comments."""

from __future__ import annotations

import math

import m3tfed.plugins.aggregators as builtin_aggregators
import pytest
import torch
from m3tfed.federation.aggregation import Aggregator, ComponentUpdate
from m3tfed.federation.checkpoint import load_checkpoint, save_checkpoint
from m3tfed.plugin_manager import PluginManager
from m3tfed.plugins.aggregators import (
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    Median,
    NormBound,
    TrimmedMean,
)

C = "expert.swiglu_0"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def upd(
    institution: str, delta: list[float], weight: float = 1.0, component: str = C, key: str = "w"
) -> ComponentUpdate:
    return ComponentUpdate(institution, component, {key: t(*delta)}, weight)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, t(*expected), rtol=1e-6, atol=1e-7)


# -- the plugin surface ----------------------------------------------------------
def test_builtins_register_through_the_hook():
    pm = PluginManager()
    pm.register(builtin_aggregators, name="builtin_aggregators", package="m3tfed")
    cat = pm.catalogue()
    assert [b for b in cat.broken if b.kind == "aggregator"] == []
    assert cat.names("aggregator") == [
        "fedadam",
        "fedavg",
        "fedprox",
        "fedyogi",
        "median",
        "norm_bound",
        "trimmed_mean",
    ]
    agg = cat.get("aggregator", "fedavg").build(server_lr=0.5)
    assert isinstance(agg, Aggregator) and agg.server_lr == 0.5
    assert cat.get("aggregator", "fedprox").build().proximal_mu == 0.01
    assert cat.get("aggregator", "fedadam").build(eta=0.1).eta == 0.1
    assert cat.get("aggregator", "trimmed_mean").build(beta=0.2).beta == 0.2


@pytest.mark.parametrize(
    "cls, options, match",
    [
        (FedAvg, {"server_lr": 0.0}, "server_lr"),
        (FedProx, {"mu": -1.0}, "mu"),
        (FedAdam, {"beta1": 1.0}, "beta1"),
        (FedYogi, {"tau": 0.0}, "tau"),
        (TrimmedMean, {"beta": 0.5}, "beta"),
        (Median, {"server_lr": float("nan")}, "server_lr"),
    ],
)
def test_bad_options_are_named(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(**options)


# -- FedAvg / FedProx ------------------------------------------------------------
def test_fedavg_weighted_mean():
    current = {"w": t(1.0, 2.0)}
    updates = [upd("A", [1.0, -2.0], weight=1), upd("B", [4.0, 2.0], weight=3)]
    # mean delta = (1*[1, -2] + 3*[4, 2]) / 4 = [13/4, 4/4] = [3.25, 1.0]
    close(FedAvg().aggregate(C, current, updates)["w"], [4.25, 3.0])
    # server_lr 0.5: [1 + 0.5*3.25, 2 + 0.5*1.0]
    close(FedAvg(server_lr=0.5).aggregate(C, current, updates)["w"], [2.625, 2.5])


def test_fedavg_weights_by_routed_tokens_and_keeps_int_buffers():
    # An expert weighted by tokens routed to it: 30 tokens at A, 10 at B.
    current = {"w": t(0.0, 0.0), "calls": torch.tensor([7], dtype=torch.int64)}
    updates = [
        ComponentUpdate("A", C, {"w": t(2.0, 0.0)}, weight=30),
        # int buffers may travel; they are ignored and the server's value is kept
        ComponentUpdate("B", C, {"w": t(-2.0, 4.0), "calls": torch.tensor([100])}, weight=10),
    ]
    new = FedAvg().aggregate(C, current, updates)
    # (30*[2, 0] + 10*[-2, 4]) / 40 = [40/40, 40/40] = [1, 1]
    close(new["w"], [1.0, 1.0])
    assert new["calls"].dtype == torch.int64 and new["calls"].tolist() == [7]


def test_fedprox_aggregates_like_fedavg_and_announces_mu():
    current = {"w": t(1.0, 2.0)}
    updates = [upd("A", [1.0, -2.0], weight=1), upd("B", [4.0, 2.0], weight=3)]
    prox = FedProx(mu=0.1)
    assert prox.proximal_mu == 0.1 and FedAvg().proximal_mu == 0.0
    close(prox.aggregate(C, current, updates)["w"], [4.25, 3.0])


def test_bf16_component_accumulates_in_float32():
    current = {"w": torch.tensor([256.0, 1.0], dtype=torch.bfloat16)}
    # each delta alone is below bf16 resolution at 256 (spacing 2); the mean is 2.0
    updates = [
        ComponentUpdate("A", C, {"w": torch.tensor([1.5, 0.5], dtype=torch.bfloat16)}, 1),
        ComponentUpdate("B", C, {"w": torch.tensor([2.5, 0.5], dtype=torch.bfloat16)}, 1),
    ]
    new = FedAvg().aggregate(C, current, updates)["w"]
    assert new.dtype == torch.bfloat16 and new.tolist() == [258.0, 1.5]


# -- FedAdam / FedYogi: two steps by hand -----------------------------------------
# eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3, x0 = [0, 0], m and v start at 0.
# Step 1: g1 = mean([0, -4], [2, 0]) = [1, -2]
#   m1 = 0.1 * g1 = [0.1, -0.2];  v1 = 0.01 * g1^2 = [0.01, 0.04] (Adam and Yogi:
#   Yogi's v0 - 0.01 * g^2 * sign(0 - g^2) is the same)
#   x1 = 0.1 * [0.1 / (0.1 + 0.001), -0.2 / (0.2 + 0.001)] = [0.0990099, -0.0995025]
# Step 2: g2 = mean([3, 1], [3, -1]) = [3, 0]
#   m2 = 0.9 * m1 + 0.1 * g2 = [0.39, -0.18]
#   Adam v2 = 0.99 * v1 + 0.01 * g2^2 = [0.0999, 0.0396]
#   Yogi v2 = v1 - 0.01 * g2^2 * sign(v1 - g2^2) = [0.01 + 0.09, 0.04 - 0] = [0.1, 0.04]
X1 = [0.1 * 0.1 / 0.101, 0.1 * -0.2 / 0.201]
STEP1 = [upd("A", [0.0, -4.0]), upd("B", [2.0, 0.0])]
STEP2 = [upd("A", [3.0, 1.0]), upd("B", [3.0, -1.0])]


@pytest.mark.parametrize(
    "cls, v2",
    [(FedAdam, [0.0999, 0.0396]), (FedYogi, [0.1, 0.04])],
)
def test_server_optimizer_two_steps(cls, v2):
    agg = cls(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    x1 = agg.aggregate(C, {"w": t(0.0, 0.0)}, STEP1)
    close(x1["w"], X1)
    state = agg.state_dict()
    close(state[f"{C}::w::m"], [0.1, -0.2])
    close(state[f"{C}::w::v"], [0.01, 0.04])

    x2 = agg.aggregate(C, x1, STEP2)
    m2 = [0.39, -0.18]
    expected = [X1[i] + 0.1 * m2[i] / (math.sqrt(v2[i]) + 1e-3) for i in range(2)]
    # Adam: [0.0990099 + 0.1230013, -0.0995025 - 0.0900011] = [0.2220112, -0.1895036]
    # Yogi: [0.0990099 + 0.1229400, -0.0995025 - 0.0895522] = [0.2219499, -0.1890547]
    close(x2["w"], expected)
    close(agg.state_dict()[f"{C}::w::m"], m2)
    close(agg.state_dict()[f"{C}::w::v"], v2)


def test_fedadam_and_fedyogi_differ_at_step_two():
    results = {}
    for cls in (FedAdam, FedYogi):
        agg = cls(eta=0.1)
        x1 = agg.aggregate(C, {"w": t(0.0, 0.0)}, STEP1)
        results[cls] = agg.aggregate(C, x1, STEP2)["w"]
    close(results[FedAdam], [0.2220112, -0.1895036])
    close(results[FedYogi], [0.2219499, -0.1890547])


def _rounds(agg: Aggregator, states: dict, rounds: list) -> dict:
    for updates_by_component in rounds:
        for component, updates in updates_by_component.items():
            states[component] = agg.aggregate(component, states[component], updates)
    return states


def test_resumed_fedadam_matches_uninterrupted(tmp_path):
    g = torch.Generator().manual_seed(0)

    def round_updates():
        return {
            comp: [
                ComponentUpdate(
                    inst,
                    comp,
                    {"w": torch.randn(3, generator=g), "b": torch.randn(1, generator=g)},
                    w,
                )
                for inst, w in (("A", 5.0), ("B", 2.0))
            ]
            for comp in ("router", "expert.swiglu_0")
        }

    rounds = [round_updates() for _ in range(4)]
    start = {c: {"w": torch.zeros(3), "b": torch.zeros(1)} for c in ("router", "expert.swiglu_0")}

    straight = _rounds(FedAdam(), {c: dict(s) for c, s in start.items()}, rounds)

    first = FedAdam()
    half = _rounds(first, {c: dict(s) for c, s in start.items()}, rounds[:2])
    save_checkpoint(tmp_path / "ckpt", first.state_dict(), {"round": 2})
    state, meta = load_checkpoint(tmp_path / "ckpt")
    resumed = FedAdam()
    resumed.load_state_dict(state)
    assert meta == {"round": 2}
    result = _rounds(resumed, half, rounds[2:])
    for component in start:
        for key in ("w", "b"):
            assert torch.equal(result[component][key], straight[component][key])


def test_server_optimizer_restarts_moments_when_a_component_grows():
    agg = FedAdam(eta=0.1)
    agg.aggregate("router", {"w": t(0.0, 0.0)}, [upd("A", [1.0, -2.0], component="router")])
    grown = agg.aggregate(
        "router", {"w": t(0.0, 0.0, 0.0)}, [upd("A", [1.0, -2.0, 0.0], component="router")]
    )
    # fresh moments: the same step as a first step
    close(grown["w"], [X1[0], X1[1], 0.0])


def test_load_state_dict_rejects_foreign_keys():
    with pytest.raises(ValueError, match="not 'component::param::m|v'"):
        FedAdam().load_state_dict({"router.w": torch.zeros(1)})
    with pytest.raises(ValueError, match="needs both m and v"):
        FedAdam().load_state_dict({"router::w::m": torch.zeros(1)})
    with pytest.raises(ValueError, match="keeps no server state"):
        FedAvg().load_state_dict({"router::w::m": torch.zeros(1)})


# -- robust aggregators -----------------------------------------------------------
ODD = [upd("A", [1.0, 10.0], 100), upd("B", [2.0, -5.0], 1), upd("C", [9.0, 0.0], 1)]
EVEN = ODD + [upd("D", [4.0, 3.0], 1)]


def test_median_odd_count_ignores_weights():
    # column 0: 1, 2, 9 -> 2; column 1: -5, 0, 10 -> 0 (A's weight of 100 changes nothing)
    close(Median().aggregate(C, {"w": t(1.0, 1.0)}, ODD)["w"], [3.0, 1.0])


def test_median_even_count_averages_the_middle_pair():
    # column 0: 1, 2, 4, 9 -> (2 + 4) / 2 = 3; column 1: -5, 0, 3, 10 -> (0 + 3) / 2 = 1.5
    close(Median().aggregate(C, {"w": t(0.0, 0.0)}, EVEN)["w"], [3.0, 1.5])


def test_trimmed_mean_trims_one_from_each_end():
    updates = EVEN + [upd("E", [100.0, -100.0], 1)]
    # beta 0.2 * 5 updates = 1 trimmed at each end
    # column 0: 1, [2, 4, 9], 100 -> 15 / 3 = 5; column 1: -100, [-5, 0, 3], 10 -> -2 / 3
    new = TrimmedMean(beta=0.2).aggregate(C, {"w": t(0.0, 0.0)}, updates)["w"]
    close(new, [5.0, -2.0 / 3.0])


def test_trimmed_mean_beta_zero_is_the_unweighted_mean():
    # column 0: (1 + 2 + 9) / 3 = 4; column 1: (10 - 5 + 0) / 3 = 5 / 3
    close(TrimmedMean(beta=0.0).aggregate(C, {"w": t(0.0, 0.0)}, ODD)["w"], [4.0, 5.0 / 3.0])


def test_trimmed_mean_too_few_updates_is_an_error():
    with pytest.raises(
        ValueError, match=r"'expert.swiglu_0'.*beta=0.2.*at least 5 updates \(got 4\)"
    ):
        TrimmedMean(beta=0.2).aggregate(C, {"w": t(0.0, 0.0)}, EVEN)


# -- contract shared by every aggregator ---------------------------------------------
ALL = [FedAvg, FedProx, FedAdam, FedYogi, Median, lambda: TrimmedMean(beta=0.25)]


@pytest.mark.parametrize("make", ALL)
def test_aggregate_never_mutates_current_or_updates(make):
    current = {"w": t(1.0, 2.0), "n": torch.tensor([3])}
    before = {k: v.clone() for k, v in current.items()}
    updates = [upd(name, [float(i), -float(i)], weight=i + 1) for i, name in enumerate("ABCD")]
    deltas = [u.delta["w"].clone() for u in updates]
    new = make().aggregate(C, current, updates)
    for k in current:
        assert torch.equal(current[k], before[k])
        assert new[k].untyped_storage().data_ptr() != current[k].untyped_storage().data_ptr()
    for u, d in zip(updates, deltas):
        assert torch.equal(u.delta["w"], d)


@pytest.mark.parametrize("make", ALL)
def test_empty_updates_name_the_component(make):
    with pytest.raises(ValueError, match=r"component 'expert.swiglu_0': no updates"):
        make().aggregate(C, {"w": t(0.0, 0.0)}, [])


@pytest.mark.parametrize(
    "bad, match",
    [
        (
            ComponentUpdate("B", C, {"w": t(1.0, 2.0, 3.0)}, 1),
            r"institution 'B': key 'w' has shape \(3,\), the component has \(2,\)",
        ),
        (
            ComponentUpdate("B", C, {"v": t(1.0, 2.0)}, 1),
            r"institution 'B' has key 'v' that the component does not have",
        ),
        (ComponentUpdate("B", C, {}, 1), r"institution 'B' lacks key 'w'"),
        (ComponentUpdate("B", C, {"w": t(1.0, 2.0)}, 0), r"institution 'B' has weight 0"),
        (
            ComponentUpdate("B", C, {"w": t(1.0, float("nan"))}, 1),
            r"institution 'B': key 'w' holds NaN",
        ),
        (
            ComponentUpdate("B", C, {"w": torch.tensor([1, 2])}, 1),
            r"institution 'B': key 'w' has dtype torch.int64",
        ),
        (
            ComponentUpdate("B", "router", {"w": t(1.0, 2.0)}, 1),
            r"institution 'B' is for component 'router'",
        ),
        (ComponentUpdate("A", C, {"w": t(1.0, 2.0)}, 1), r"institution 'A' appears twice"),
    ],
)
def test_bad_updates_name_component_institution_and_key(bad, match):
    with pytest.raises(ValueError, match=rf"component 'expert.swiglu_0': update from {match}"):
        FedAvg().aggregate(C, {"w": t(0.0, 0.0)}, [upd("A", [1.0, 1.0]), bad])


def test_a_subclass_overrides_combine_only():
    class Largest(Aggregator):
        """Take the delta of the update with the largest weight."""

        def combine(self, component, current, updates):
            best = max(updates, key=lambda u: u.weight)
            return {k: best.delta[k] for k in current if k in best.delta}

    new = Largest().aggregate(
        C, {"w": t(1.0, 1.0)}, [upd("A", [1.0, 2.0], 1), upd("B", [5.0, 6.0], 9)]
    )
    close(new["w"], [6.0, 7.0])


# -- norm bounding: a defence that holds with one or two contributors per component -----
def test_norm_bound_scales_an_update_down_to_the_components_history():
    agg = NormBound(multiplier=3.0)
    # first round: no history, so the bound is first_relative * ||(3, 4)|| = 5
    current = {"w": t(3.0, 4.0)}
    new = agg.aggregate(C, current, [upd("a", [0.3, 0.4]), upd("b", [0.0, 1.0])])  # norms 0.5, 1.0
    close(new["w"], [3.15, 4.7])
    assert agg.history[C] == pytest.approx([0.5, 1.0])
    # round 2: bound = 3 * median(0.5, 1.0) = 3 * 0.75 = 2.25; b sends x10^4 (norm 10^4)
    new2 = agg.aggregate(C, new, [upd("a", [0.3, 0.4]), upd("b", [0.0, 1.0e4], weight=1000.0)])
    # b scaled to (0, 2.25); weighted mean (1*(0.3,0.4) + 1000*(0,2.25)) / 1001
    close(new2["w"], [3.15 + 0.3 / 1001, 4.7 + (0.4 + 2250.0) / 1001])
    assert agg.last_bounds[C] == (pytest.approx(2.25), ["b"])
    assert agg.history[C] == pytest.approx([0.5, 1.0, 0.5, 2.25])
    # the history is server state: it survives a checkpoint
    again = NormBound(multiplier=3.0)
    again.load_state_dict(agg.state_dict())
    assert again.history == agg.history and again.bound(C, new2) == pytest.approx(agg.bound(C, new2))


def test_norm_bound_max_norm_and_inner_aggregator():
    agg = NormBound(inner="median", max_norm=1.0)
    new = agg.aggregate(C, {"w": t(0.0)}, [upd("a", [0.5]), upd("b", [-100.0]), upd("c", [3.0])])
    close(new["w"], [0.5])  # bounded to 0.5, -1, 1; median 0.5
    assert isinstance(agg.aggregator, Median)
    with pytest.raises(ValueError, match="option multiplier must be a finite number > 0"):
        NormBound(multiplier=0)
    with pytest.raises(KeyError, match="no aggregator plugin named 'nope'"):
        NormBound(inner="nope")


def test_a_1e4_update_to_a_two_contributor_expert_is_bounded():
    """One of the two institutions training expert general_0 sends its round-2 update
    scaled x10^4. FedAvg moves the expert thousands of times further than an honest
    round; norm_bound keeps the move within its bound (3 x the median honest norm)."""
    from conftest import tiny_config_dict
    from m3tfed.federation.build import build_federation
    from m3tfed.federation.config import load_config

    def run(aggregator):
        d = tiny_config_dict(rounds=2, local_steps=2)
        d["institutions"] = [i for i in d["institutions"] if i["name"] in ("university", "rural_school", "math_academy")]
        for inst, experts in zip(d["institutions"], (["general_0", "tabular_0"], ["small_0", "small_1"], ["general_0", "tabular_1"])):
            inst["experts"] = experts
        d["aggregation"] = {"default": {"plugin": "fedavg"}, "expert": aggregator}
        fed = build_federation(load_config(d))
        train = fed.server.backend.train

        def attacked(jobs):
            results = train(jobs)
            for r in results:
                for u in getattr(r, "updates", []):
                    if jobs[0].round == 2 and r.institution == "math_academy" and u.component == "expert.general_0":
                        u.delta = {k: v * 1e4 for k, v in u.delta.items()}
            return results

        fed.server.backend.train = attacked
        rep1 = fed.server.run_round(1)
        before = {k: v.clone() for k, v in fed.server.state["expert.general_0"].items()}
        rep2 = fed.server.run_round(2)
        assert rep1.contributors["expert.general_0"] == rep2.contributors["expert.general_0"] == ["math_academy", "university"]
        after = fed.server.state["expert.general_0"]
        return math.sqrt(sum(float((after[k] - before[k]).pow(2).sum()) for k in before)), fed

    moved_fedavg, _ = run({"plugin": "fedavg"})
    moved_bounded, fed = run({"plugin": "norm_bound", "options": {"multiplier": 3.0}})
    agg = fed.server.aggregator("expert.general_0")
    honest_round1 = agg.history["expert.general_0"][:2]  # both contributors, round 1
    bound, scaled = agg.last_bounds["expert.general_0"]
    assert scaled == ["math_academy"]
    assert bound == pytest.approx(3.0 * sum(honest_round1) / 2)
    assert moved_bounded <= bound * (1 + 1e-6)
    assert moved_fedavg > 1000 * bound  # the undefended expert is thrown far away
