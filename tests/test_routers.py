"""The built-in routers: registration, hand-computed losses, masked gating, capacity,
expert choice and the soft mixture. Tiny sizes: every test runs in milliseconds."""

import math

import pytest
import torch
from m3tfed.plugins.routers import (
    ExpertChoiceRouter,
    SoftRouter,
    TaskTopKRouter,
    TopKRouter,
    register_routers,
)
from m3tfed.testing import check_router

ROUTERS = {
    "topk": TopKRouter,
    "task_topk": TaskTopKRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftRouter,
}


def specs():
    found = []
    register_routers(found.append)
    return {s.name: s for s in found}


def logit_router(cls, E, **options):
    """A router whose gate is the identity, so the input rows ARE the logits."""
    router = cls(E, E, **options)
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E))
    return router


def test_registered_with_metadata():
    found = specs()
    assert set(found) == set(ROUTERS)
    for name, spec in found.items():
        assert spec.build is ROUTERS[name]
        assert spec.version and spec.license == "Apache-2.0" and spec.description


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_plugin_kit_accepts_builtin_router(name):
    # contract, masks (incl. a single allowed expert, fewer than k), backward, determinism
    check_router(specs()[name], num_experts=4, d_model=16, n_tokens=8)


def test_load_balance_loss_top1_hand_computed():
    p = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]]
    )
    router = logit_router(TopKRouter, 4, k=1, capacity_factor=None)
    r = router(p.log())
    # f = (2, 1, 1, 0)/4 tokens; P = column means (0.4, 0.25, 0.25, 0.1)
    expected = 4 * (0.5 * 0.4 + 0.25 * 0.25 + 0.25 * 0.25 + 0.0 * 0.1)  # = 1.3
    assert r.aux_losses["load_balance"].item() == pytest.approx(expected, abs=1e-6)
    assert r.expert_index.tolist() == [0, 0, 1, 2]


def test_load_balance_loss_top2_over_active_experts_only():
    # expert 3 is masked: its huge logit must not count; probs are over the 3 active
    p = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    x = torch.cat([p.log(), torch.full((2, 1), 10.0)], dim=1)
    router = logit_router(TopKRouter, 4, k=2, capacity_factor=None)
    r = router(x, torch.tensor([True, True, True, False]))
    # assignments e0, e1 | e1, e2 -> f = (1, 2, 1)/4; P = (0.35, 0.4, 0.25); E_active = 3
    expected = 3 * (0.25 * 0.35 + 0.5 * 0.4 + 0.25 * 0.25)  # = 1.05
    assert r.aux_losses["load_balance"].item() == pytest.approx(expected, abs=1e-6)
    assert sorted(zip(r.token_index.tolist(), r.expert_index.tolist())) == [
        (0, 0),
        (0, 1),
        (1, 1),
        (1, 2),
    ]


def test_load_balance_loss_is_one_when_perfectly_balanced():
    router = logit_router(TopKRouter, 4, k=2, capacity_factor=None)
    x = torch.tensor(
        [[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 1.0], [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 1.0, 2.0]]
    )
    assert router(x).aux_losses["load_balance"].item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_z_loss_hand_computed(name):
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(2), math.log(3), math.log(4)]])
    r = logit_router(ROUTERS[name], 4)(x)
    expected = (math.log(4) ** 2 + math.log(10) ** 2) / 2
    assert r.aux_losses["router_z"].item() == pytest.approx(expected, rel=1e-6)
    # masked: logsumexp over the active experts only (the 100 is ignored)
    x = torch.tensor([[0.0, 0.0, 0.0, 100.0]])
    r = logit_router(ROUTERS[name], 4)(x, torch.tensor([True, True, True, False]))
    assert r.aux_losses["router_z"].item() == pytest.approx(math.log(3) ** 2, rel=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_masked_gating_never_picks_an_unselected_expert(name, seed):
    gen = torch.Generator().manual_seed(seed)
    E, N, d = 6, 24, 8
    torch.manual_seed(seed)
    router = ROUTERS[name](d, E)
    for _ in range(4):
        mask = torch.rand(E, generator=gen) < 0.5
        mask[torch.randint(E, (1,), generator=gen)] = True  # at least one selected
        # large inputs: logits far apart, so probabilities of active experts can underflow
        x = torch.randn(N, d, generator=gen) * 50
        r = router(x, mask)
        assert mask[r.expert_index].all(), (mask, r.expert_index.unique())
        assert (r.stats["tokens_per_expert"][~mask] == 0).all()
        assert torch.isfinite(r.weight).all() and (r.weight >= 0).all()
        assert all(torch.isfinite(v) for v in r.aux_losses.values())


def test_topk_with_fewer_active_experts_than_k():
    r = TopKRouter(8, 4, k=3, capacity_factor=None)(
        torch.randn(5, 8), torch.tensor([False, True, False, True])
    )
    assert set(r.expert_index.tolist()) <= {1, 3}
    assert len(r.token_index) == 5 * 2  # k clamped to the 2 active experts
    per_token = torch.zeros(5).index_add_(0, r.token_index, r.weight)
    torch.testing.assert_close(per_token, torch.ones(5))  # all the probability mass


def test_capacity_overflow_drops_and_counts():
    # every token prefers expert 0; capacity = ceil(0.5 * 8 * 1 / 2) = 2
    router = logit_router(TopKRouter, 2, k=1, capacity_factor=0.5)
    x = torch.tensor([[1.0, 0.0]]).repeat(8, 1)
    r = router(x)
    assert r.stats["capacity"] == 2
    assert r.expert_index.tolist() == [0, 0] and r.token_index.tolist() == [0, 1]  # first come
    assert r.stats["dropped"] == 6 and r.stats["dropped_fraction"] == pytest.approx(0.75)
    assert r.stats["tokens_unrouted"] == 6
    assert r.stats["tokens_per_expert"].tolist() == [2, 0]
    # balance loss still sees what the router wanted (f before capacity): 2 * (1 * P_0)
    assert r.aux_losses["load_balance"].item() == pytest.approx(
        2 * torch.tensor([1.0, 0.0]).softmax(0)[0].item(), rel=1e-6
    )


def test_capacity_keeps_first_choices_before_second_choices():
    # token 0: (e0, e1); tokens 1, 2: (e1, e0). capacity = ceil(0.5 * 3 * 2 / 2) = 2
    router = logit_router(TopKRouter, 2, k=2, capacity_factor=0.5)
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 1.0]])
    r = router(x)
    got = sorted(zip(r.expert_index.tolist(), r.token_index.tolist()))
    # e0: token 0 (1st choice), then token 1 (2nd choice; token 2's comes later) -> token 2 dropped
    # e1: tokens 1, 2 (1st choices) -> token 0's second choice dropped
    assert got == [(0, 0), (0, 1), (1, 1), (1, 2)]
    assert r.stats["dropped"] == 2 and r.stats["tokens_unrouted"] == 0
    # kept weights are unchanged softmax probabilities (no renormalisation after drops)
    p = x.softmax(-1)
    w = {
        (e, t): v
        for e, t, v in zip(r.expert_index.tolist(), r.token_index.tolist(), r.weight.tolist())
    }
    assert w[(0, 0)] == pytest.approx(p[0, 0].item()) and w[(0, 1)] == pytest.approx(p[1, 0].item())


def test_no_capacity_limit_drops_nothing():
    for cf in (None, 0):
        r = TopKRouter(8, 4, k=2, capacity_factor=cf)(torch.randn(16, 8) * 10)
        assert len(r.expert_index) == 32 and r.stats["dropped"] == 0 and r.stats["capacity"] is None


def test_renormalize_makes_topk_weights_sum_to_one():
    r = TopKRouter(8, 6, k=2, capacity_factor=None, renormalize=True)(torch.randn(10, 8))
    torch.testing.assert_close(
        torch.zeros(10).index_add_(0, r.token_index, r.weight), torch.ones(10)
    )


def test_noise_only_in_training():
    router = TopKRouter(8, 4, noise_std=1.0)
    x = torch.randn(6, 8)
    router.eval()
    a, b = router(x), router(x)
    assert torch.equal(a.weight, b.weight)
    router.train()
    torch.manual_seed(0)
    assert not torch.equal(router(x).weight, a.weight)


@pytest.mark.parametrize("mask", [None, torch.tensor([True, False, True, True, False])])
def test_expert_choice_each_expert_gets_exactly_c_tokens(mask):
    N, E = 12, 5
    router = ExpertChoiceRouter(8, E, k=2, capacity_factor=1.0)
    r = router(torch.randn(N, 8), mask)
    active = torch.ones(E, dtype=torch.bool) if mask is None else mask
    C = math.ceil(N * 2 / int(active.sum()))
    assert r.stats["capacity"] == C
    assert r.stats["tokens_per_expert"].tolist() == [C if a else 0 for a in active.tolist()]
    for e in active.nonzero().squeeze(1).tolist():
        picked = r.token_index[r.expert_index == e]
        assert len(picked) == C and len(picked.unique()) == C  # C distinct tokens
    unrouted = N - len(r.token_index.unique())
    assert r.stats["tokens_unrouted"] == r.stats["dropped"] == unrouted


def test_expert_choice_picks_highest_affinity_and_counts_unrouted_tokens():
    # 4 tokens, 2 experts, C = ceil(0.5 * 4 * 1 / 2) = 1: each expert takes its best token
    router = logit_router(ExpertChoiceRouter, 2, k=1, capacity_factor=0.5)
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.5]])
    r = router(x)
    assert sorted(zip(r.expert_index.tolist(), r.token_index.tolist())) == [(0, 0), (1, 2)]
    assert r.stats["tokens_unrouted"] == 2
    torch.testing.assert_close(r.weight, torch.stack([x[0].softmax(0)[0], x[2].softmax(0)[1]]))


def test_expert_choice_capacity_never_exceeds_tokens():
    r = ExpertChoiceRouter(8, 4, k=2, capacity_factor=4.0)(torch.randn(3, 8))
    assert r.stats["capacity"] == 3 and r.stats["tokens_unrouted"] == 0


def test_soft_routes_every_token_to_every_active_expert():
    mask = torch.tensor([True, False, True, True])
    router = SoftRouter(8, 4, temperature=0.5)
    x = torch.randn(5, 8)
    r = router(x, mask)
    assert len(r.token_index) == 5 * 3
    pairs = set(zip(r.token_index.tolist(), r.expert_index.tolist()))
    assert pairs == {(t, e) for t in range(5) for e in (0, 2, 3)}
    logits = (x @ router.gate.weight.t() / 0.5).masked_fill(~mask, float("-inf"))
    dense = torch.zeros(5, 4).index_put_((r.token_index, r.expert_index), r.weight)
    torch.testing.assert_close(dense, logits.softmax(-1))


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_empty_batch(name):
    r = ROUTERS[name](8, 4)(torch.zeros(0, 8))
    assert len(r.token_index) == 0 and r.stats["tokens_per_expert"].tolist() == [0, 0, 0, 0]
    assert all(torch.isfinite(v) for v in r.aux_losses.values())


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_bad_masks_are_rejected(name):
    router = ROUTERS[name](8, 4)
    with pytest.raises(ValueError, match="selects no expert"):
        router(torch.randn(3, 8), torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[4\]"):
        router(torch.randn(3, 8), torch.ones(3, dtype=torch.bool))


def test_gradients_reach_the_gate():
    for cls in ROUTERS.values():
        router = cls(8, 4)
        r = router(torch.randn(6, 8))
        (r.weight.sum() + sum(r.aux_losses.values())).backward()
        assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_task_topk_starts_as_topk_and_routes_by_its_per_task_bias():
    torch.manual_seed(0)
    plain, tasked = (
        TopKRouter(8, 4, k=1, capacity_factor=None),
        TaskTopKRouter(8, 4, k=1, capacity_factor=None),
    )
    tasked.gate.weight.data.copy_(plain.gate.weight.data)
    x = torch.randn(6, 8)
    task_a, task_b = (
        torch.eye(8)[0] * 0.02,
        torch.eye(8)[1] * 0.02,
    )  # small, like the task embeddings
    for task in (None, task_a, task_b):  # zero bias: the same routing as topk, task or not
        assert torch.equal(tasked(x, task=task).expert_index, plain(x).expert_index)
    with torch.no_grad():  # task a favours expert 2, task b expert 3 (t is scaled to norm sqrt(8))
        tasked.task_gate[2, 0] = tasked.task_gate[3, 1] = 10.0
    assert tasked(x, task=task_a).expert_index.tolist() == [2] * 6
    assert tasked(x, task=task_b).expert_index.tolist() == [3] * 6


def test_the_moe_layer_passes_the_task_only_to_a_router_that_takes_it():
    from m3tfed.experts.swiglu import SwiGLUExpert
    from m3tfed.moe import MoELayer

    torch.manual_seed(0)
    names = ["e0", "e1", "e2"]

    def layer(router):
        return MoELayer(8, names, {n: SwiGLUExpert(8, hidden=8) for n in names}, router).eval()

    tasked = TaskTopKRouter(8, 3, k=1)
    with torch.no_grad():
        tasked.task_gate[1, 0] = 10.0  # this task sends every token to e1
    x, task = torch.randn(5, 8), torch.eye(8)[0]
    assert layer(tasked)(x, task=task).stats["tokens_per_expert"].tolist() == [0, 5, 0]
    # a router without takes_task is called as before (no task keyword)
    assert layer(TopKRouter(8, 3, k=1))(x, task=task).stats["tokens_per_expert"].sum() == 5
