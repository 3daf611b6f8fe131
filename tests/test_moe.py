"""The MoE layer: equals a naive per-token reference for every router, the stacked fast
path equals the loop (outputs and gradients), masked and non-local experts are never
called, dropped tokens contribute nothing. Tiny sizes only."""

import pytest
import torch
from m3tfed import ContractError, Routing
from m3tfed.experts import LowRankExpert, SwiGLUExpert
from m3tfed.moe import MoELayer, MoEOutput
from m3tfed.plugins.routers import ExpertChoiceRouter, SoftRouter, TopKRouter
from torch import nn

D = 16
ROUTERS = {"topk": TopKRouter, "expert_choice": ExpertChoiceRouter, "soft": SoftRouter}


class Spy(nn.Module):
    """Wraps an expert and records the row count of every call."""

    moe_stackable = False

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        return self.inner(x)


def naive_reference(layer: MoELayer, x, router_input=None, expert_mask=None) -> torch.Tensor:
    """One token, one assignment at a time (test only)."""
    mask = layer.local_mask if expert_mask is None else layer.local_mask & expert_mask
    r = layer.router(x if router_input is None else router_input, mask)
    y = torch.zeros_like(x)
    for t, e, w in zip(r.token_index.tolist(), r.expert_index.tolist(), r.weight):
        y[t] += w * layer.experts[layer.expert_names[e]](x[t : t + 1])[0]
    return y


def hetero_layer(router_name: str, dispatch: str = "auto", seed: int = 0) -> MoELayer:
    """6 global experts; 5 built here (3 SwiGLU, 2 low-rank), "far" is not."""
    torch.manual_seed(seed)
    names = ["s0", "s1", "far", "s2", "l0", "l1"]
    local = {"s0": SwiGLUExpert(D, 24), "s1": SwiGLUExpert(D, 24), "s2": SwiGLUExpert(D, 24), "l0": LowRankExpert(D, 4), "l1": LowRankExpert(D, 4)}
    return MoELayer(D, names, local, ROUTERS[router_name](D, len(names)), dispatch=dispatch)


@pytest.mark.parametrize("dispatch", ["loop", "stacked", "auto"])
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_layer_matches_naive_reference(router, dispatch):
    layer = hetero_layer(router, dispatch)
    x, task = torch.randn(11, D), torch.randn(D)
    out = layer(x, router_input=x + task)
    assert isinstance(out, MoEOutput) and out.y.shape == x.shape
    torch.testing.assert_close(out.y, naive_reference(layer, x, router_input=x + task), atol=1e-5, rtol=1e-5)
    assert out.stats["tokens_per_expert"][2] == 0  # "far" is not built here
    if dispatch != "loop":
        assert "stacked" in out.stats["dispatch"]  # the SwiGLU and low-rank groups stack


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_routing_by_source_routes_each_sources_tokens_among_its_experts(router):
    layer = hetero_layer(router).eval()
    x = torch.randn(12, D)
    source = torch.tensor([0, 1, 2] * 4)
    masks = torch.tensor([
        [True] * 6,  # source 0: any expert
        [True, False, False, False, True, False],  # source 1: s0, l0
        [False, False, True, False, False, False],  # source 2: only "far", not built here
    ])  # fmt: skip
    out = layer(x, token_source=source, n_sources=3, source_masks=masks)
    per_source = out.stats["tokens_per_source_expert"]
    assert per_source[1, [1, 2, 3, 5]].sum() == 0 and per_source[1].sum() > 0
    assert per_source[:, 2].sum() == 0  # an unbuilt expert never; source 2 keeps the layer's mask
    assert per_source.sum(0).tolist() == out.stats["tokens_per_expert"].tolist()
    empty = layer(x[:0], token_source=source[:0], n_sources=3, source_masks=masks)
    assert empty.y.shape == (0, D) and empty.stats["tokens_per_source_expert"].sum() == 0
    # each source's outputs are what the layer gives its tokens alone, among its experts
    for s, allowed in enumerate(masks):
        rows = (source == s).nonzero().squeeze(1)
        alone = layer(x[rows], expert_mask=allowed if bool((allowed & layer.local_mask).any()) else None)
        torch.testing.assert_close(out.y[rows], alone.y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("router", ["topk", "soft"])
def test_stacked_fast_path_equals_loop_outputs_and_gradients(router):
    torch.manual_seed(0)
    names = [f"e{i}" for i in range(4)]
    experts = {n: SwiGLUExpert(D, 32) for n in names}
    r = ROUTERS[router](D, 4)
    loop, stacked = MoELayer(D, names, experts, r, dispatch="loop"), MoELayer(D, names, experts, r, dispatch="stacked")
    x = torch.randn(13, D)
    g = torch.randn(13, D)
    grads = []
    for layer in (loop, stacked):
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = layer(xi)
        ((out.y * g).sum() + sum(out.aux_losses.values())).backward()
        grads.append((out, xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}))
    (o1, gx1, gp1), (o2, gx2, gp2) = grads
    assert o1.stats["dispatch"] == "loop" and o2.stats["dispatch"] == "stacked"
    torch.testing.assert_close(o1.y, o2.y, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx1, gx2, atol=1e-6, rtol=1e-5)
    assert gp1.keys() == gp2.keys() and any(k.startswith("experts.") for k in gp1)
    for k in gp1:
        torch.testing.assert_close(gp1[k], gp2[k], atol=1e-6, rtol=1e-5, msg=k)


def test_auto_stacks_unless_padding_is_large_and_work_is_not_small():
    torch.manual_seed(0)
    names = [f"e{i}" for i in range(4)]
    experts = {n: SwiGLUExpert(D, 32) for n in names}
    soft = MoELayer(D, names, experts, SoftRouter(D, 4))  # every expert gets N rows: no padding
    x = torch.randn(8, D)
    assert soft(x).stats["dispatch"] == "stacked"
    soft.STACKED_MAX_PADDING, soft.STACKED_MAX_WORK = 0.0, 8 * D - 1  # neither rule applies
    assert soft(x).stats["dispatch"] == "loop"

    # skewed top-1 routing without capacity: 3 experts get 1 token, one gets 29
    router = TopKRouter(D, 4, k=1, capacity_factor=None)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 5.0
    skewed = MoELayer(D, names, experts, router)
    x = torch.randn(32, D)
    x[:29, 0], x[29:, 0] = 10.0, -10.0
    x[29:, 1:] = 0.0
    with torch.no_grad():
        router.gate.weight[1:, 1:] = torch.eye(3, D - 1) * 5.0
    x[29, 1], x[30, 2], x[31, 3] = 10.0, 10.0, 10.0
    out = skewed(x)
    assert out.stats["tokens_per_expert"].tolist() == [29, 1, 1, 1]
    skewed.STACKED_MAX_WORK = 0  # padded 4 x 29 = 116 rows for 32: loop
    assert skewed(x).stats["dispatch"] == "loop"
    skewed.STACKED_MAX_PADDING = 4.0
    assert skewed(x).stats["dispatch"] == "stacked"


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_backward_reaches_router_and_used_experts_only(router):
    layer = hetero_layer(router, "auto")
    x = torch.randn(9, D, requires_grad=True)
    mask = torch.tensor([True, True, True, False, True, True])  # s2 deselected
    out = layer(x, expert_mask=mask)
    (out.y.square().sum() + sum(out.aux_losses.values())).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    tpe = out.stats["tokens_per_expert"].tolist()
    for i, name in enumerate(layer.expert_names):
        if name not in layer.experts:
            continue
        grads = [p.grad for p in layer.experts[name].parameters()]
        if tpe[i]:
            assert all(g is not None and g.abs().sum() > 0 for g in grads), name
        else:  # never called: no gradient at all, not a zero one (optimisers skip None)
            assert all(g is None for g in grads), name
    assert tpe[3] == 0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_masked_and_missing_experts_are_never_called(router, seed):
    torch.manual_seed(seed)
    names = [f"e{i}" for i in range(6)]
    built = {n: Spy(SwiGLUExpert(D, 16)) for n in names if n != "e4"}  # e4 lives elsewhere
    layer = MoELayer(D, names, built, ROUTERS[router](D, 6))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        mask = torch.rand(6, generator=gen) < 0.6
        mask[0] = True
        for spy in built.values():
            spy.calls.clear()
        out = layer(torch.randn(10, D, generator=gen) * 10, expert_mask=mask)
        for i, n in enumerate(names):
            if n in built and not mask[i]:
                assert built[n].calls == [], n
            if n in built:
                assert sum(built[n].calls) == out.stats["tokens_per_expert"][i]
                assert len(built[n].calls) <= 1  # each expert runs once, on all its tokens
        assert out.stats["tokens_per_expert"][4] == 0
        assert (out.stats["tokens_per_expert"][~mask] == 0).all()


def test_a_router_that_ignores_the_mask_is_caught():
    class Rogue(nn.Module):
        num_experts = 3

        def forward(self, x, expert_mask=None):
            n = x.shape[0]
            return Routing(torch.arange(n), torch.full((n,), 2), torch.ones(n), {}, {})

    layer = MoELayer(D, ["a", "b", "c"], {"a": SwiGLUExpert(D, 8), "c": SwiGLUExpert(D, 8)}, Rogue())
    with pytest.raises(ContractError, match=r"Rogue.*\['c'\]"):
        layer(torch.randn(4, D), expert_mask=torch.tensor([True, True, False]))


def test_dropped_tokens_contribute_nothing():
    # k=1, every token prefers expert 0, capacity 2: tokens 2.. are dropped entirely
    names = ["a", "b"]
    torch.manual_seed(0)
    router = TopKRouter(D, 2, k=1, capacity_factor=0.5)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0, 0] = 10.0
    layer = MoELayer(D, names, {n: SwiGLUExpert(D, 16) for n in names}, router)
    x = torch.randn(8, D)
    x[:, 0] = 1.0
    out = layer(x)
    assert out.stats["dropped"] == 6 and out.stats["tokens_per_expert"].tolist() == [2, 0]
    assert torch.equal(out.y[2:], torch.zeros(6, D))
    w = (x[:2] @ router.gate.weight.t()).softmax(-1)[:, :1]
    torch.testing.assert_close(out.y[:2], w * layer.experts["a"](x[:2]))


def test_second_choice_overflow_keeps_first_choice_weight():
    # top-2 with capacity: a token whose second choice overflows keeps only its first
    # expert's output, weighted by its (unchanged) first-choice probability
    torch.manual_seed(1)
    names = ["a", "b", "c"]
    layer = MoELayer(D, names, {n: SwiGLUExpert(D, 16) for n in names}, TopKRouter(D, 3, k=2, capacity_factor=0.5))
    x = torch.randn(12, D) * 3
    out = layer(x)
    assert out.stats["dropped"] > 0
    torch.testing.assert_close(out.y, naive_reference(layer, x), atol=1e-5, rtol=1e-5)


def test_soft_output_is_the_weighted_sum_of_all_active_experts():
    torch.manual_seed(0)
    names = ["a", "b", "c", "d"]
    experts = {"a": SwiGLUExpert(D, 16), "b": LowRankExpert(D, 4), "c": SwiGLUExpert(D, 16)}  # d not built
    layer = MoELayer(D, names, experts, SoftRouter(D, 4))
    x = torch.randn(7, D)
    mask = torch.tensor([True, False, True, True])  # b deselected, d missing -> a, c
    logits = (x @ layer.router.gate.weight.t()).masked_fill(~torch.tensor([True, False, True, False]), float("-inf"))
    p = logits.softmax(-1)
    expected = p[:, :1] * experts["a"](x) + p[:, 2:3] * experts["c"](x)
    torch.testing.assert_close(layer(x, expert_mask=mask).y, expected, atol=1e-6, rtol=1e-5)


def test_unstackable_experts_fall_back_to_the_loop():
    class Fussy(nn.Module):  # data-dependent Python control flow: vmap cannot trace it
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            return self.lin(x) if float(x.sum()) > -1e9 else x

    torch.manual_seed(0)
    names = ["a", "b", "c"]
    layer = MoELayer(D, names, {n: Fussy() for n in names}, SoftRouter(D, 3))
    x = torch.randn(4, D)
    with pytest.warns(UserWarning, match="cannot run stacked"):
        out = layer(x)
    assert out.stats["dispatch"] == "loop"
    torch.testing.assert_close(out.y, naive_reference(layer, x), atol=1e-5, rtol=1e-5)
    assert layer(x).stats["dispatch"] == "loop"  # remembered: no second attempt


def test_empty_batch_and_state_dict_names():
    layer = hetero_layer("topk")
    out = layer(torch.zeros(0, D))
    assert out.y.shape == (0, D) and out.stats["tokens_per_expert"].sum() == 0
    keys = set(layer.state_dict())
    assert {"router.gate.weight", "experts.s0.up.weight", "experts.l1.out_b.bias"} <= keys
    assert not any(k.startswith(("local_mask", "slot_of_expert")) for k in keys)  # not persisted
    assert list(layer.experts) == ["s0", "s1", "s2", "l0", "l1"]  # global order


def test_invalid_construction_and_inputs():
    e = {"a": SwiGLUExpert(D, 8)}
    with pytest.raises(ValueError, match="not in the global expert list"):
        MoELayer(D, ["b"], e, TopKRouter(D, 1))
    with pytest.raises(ValueError, match="router scores 3 experts"):
        MoELayer(D, ["a", "b"], e, TopKRouter(D, 3))
    with pytest.raises(ValueError, match="duplicates"):
        MoELayer(D, ["a", "a"], e, TopKRouter(D, 2))
    layer = MoELayer(D, ["a", "b"], e, TopKRouter(D, 2))
    with pytest.raises(ValueError, match="no expert is both selected and built"):
        layer(torch.randn(3, D), expert_mask=torch.tensor([False, True]))
    with pytest.raises(ValueError, match=r"x \[N, 16\]"):
        layer(torch.randn(2, 3, D))
