"""Per-sample gradients for DP-SGD: the batched path equals the per-sample loop, and
clipping and noise still act on them."""

import warnings

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed.data import iterate_batches
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.moe import MoELayer
from m3tfed.plugins.encoders.sequence import InteractionEncoder
from m3tfed.privacy.dpsgd import (
    UnsupportedModel,
    batch_loss,
    batched_per_sample_grads,
    dp_sgd_fit,
    make_dp_optimizer,
    per_sample_grads,
)
from m3tfed.training import make_optimizer
from opacus.accountants import RDPAccountant


def setup(institution: str = "university", batch_size: int = 8, **model):
    d = tiny_config_dict(rounds=1)
    d["model"].update(model)
    fed = build_federation(load_config(d))
    inst = fed.institutions[institution]
    net = inst.load(fed.server.state)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    batch = next(iterate_batches(inst.data.train, batch_size, torch.Generator().manual_seed(0)))
    return inst, net, params, batch_loss(inst.config.tasks), batch


def loop_grads(net, loss_of, batch, params):
    return per_sample_grads(lambda one: loss_of(net, one)[0], batch, params)


def assert_same(net, params, fast, ref):
    names = {p: n for n, p in net.named_parameters()}
    for p, a, b in zip(params, fast, ref):
        assert a.shape == b.shape == (b.shape[0], *p.shape)
        assert torch.allclose(a, b, rtol=0, atol=1e-5), f"{names[p]}: max |diff| {float((a - b).abs().max()):.2e}"


# tabular + interaction logs, tabular + text (BERT), logs + image (with missing modalities)
@pytest.mark.parametrize("institution", ["university", "high_school", "online_tutor"])
def test_batched_per_sample_grads_equal_the_loop(institution):
    _, net, params, loss_of, batch = setup(institution)
    fast = batched_per_sample_grads(net, loss_of, batch, params)
    assert_same(net, params, fast, loop_grads(net, loss_of, batch, params))
    assert any(float(g.abs().max()) > 0 for g in fast)
    # and again, once the modules to re-run per sample have been learnt
    assert_same(net, params, batched_per_sample_grads(net, loss_of, batch, params), loop_grads(net, loss_of, batch, params))


def test_batched_per_sample_grads_cover_a_task_s_wide_term():
    """The wide term's linear maps (``model.tasks.<t>.wide``) get their per-sample
    gradients from the batched pass too, equal to the loop's: fitted jointly (grade,
    symbol) or to the deep head's residual (the default essays' term, on scaled features:
    the institution here has no policy, so it has its statistics)."""
    d = tiny_config_dict(rounds=1)
    d["model"]["tasks"]["grade"]["wide"] = ["tabular"]
    d["model"]["tasks"]["symbol"]["wide"] = ["image"]
    assert d["model"]["tasks"]["essay_score"]["wide_fit"] == "residual"
    fed = build_federation(load_config(d))
    with torch.no_grad():  # a residual term that predicts something already
        fed.server.state["task.essay_score"]["tasks.essay_score.wide.text.weight"].fill_(0.1)
    for name in ("math_academy", "university", "community_college"):
        inst = fed.institutions[name]
        net = inst.load(fed.server.state)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        batch = next(iterate_batches(inst.data.train, 8, torch.Generator().manual_seed(0)))
        loss_of = batch_loss(inst.config.tasks)
        fast = batched_per_sample_grads(net, loss_of, batch, params)
        assert_same(net, params, fast, loop_grads(net, loss_of, batch, params))
        wide = [g for p, g in zip(params, fast) if p is net.tasks["grade"].wide["tabular"].weight]
        assert wide and float(wide[0].abs().max()) > 0
        if "essay_score" in net.tasks:
            essay = [g for p, g in zip(params, fast) if p is net.tasks["essay_score"].wide["text"].weight]
            assert essay and float(essay[0].abs().max()) > 0


@pytest.mark.parametrize("by_modality", [False, True])
def test_each_sample_is_routed_alone_even_when_capacity_drops_tokens(by_modality):
    # A tight capacity: the batch's routing (capacity from all its tokens, priority by
    # batch position) differs from each sample's own, so only per-sample routing matches
    # (one router call per layer, or one per modality's tokens).
    _, net, params, loss_of, batch = setup(route_by_modality=by_modality, router={"plugin": "topk", "options": {"k": 2, "capacity_factor": 0.5}})
    assert (net.source_masks is not None) == by_modality
    fast = batched_per_sample_grads(net, loss_of, batch, params)
    ref = loop_grads(net, loss_of, batch, params)
    assert_same(net, params, fast, ref)
    plain = torch.autograd.grad(loss_of(net, batch)[0] * len(batch["targets"]["grade"]), params, allow_unused=True)
    assert any(g is not None and not torch.allclose(g, r.sum(0), atol=1e-4) for g, r in zip(plain, ref))


def test_the_batched_pass_leaves_no_hooks_and_restores_dispatch():
    _, net, params, loss_of, batch = setup()
    before = [m.dispatch for m in net.modules() if isinstance(m, MoELayer)]
    batched_per_sample_grads(net, loss_of, batch, params)
    assert [m.dispatch for m in net.modules() if isinstance(m, MoELayer)] == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def test_other_routers_fall_back_to_the_loop():
    inst, net, params, loss_of, batch = setup(router={"plugin": "soft"})
    with pytest.raises(UnsupportedModel, match="top-k"):
        batched_per_sample_grads(net, loss_of, batch, params)

    def fit(per_sample):
        return dp_sgd_fit(
            net, params, inst.data.train, loss_of, torch.optim.SGD(params, lr=0.0), 1, 1.0, 1.0, 0.5,
            RDPAccountant(), torch.Generator().manual_seed(0), per_sample=per_sample,
        )

    with pytest.warns(UserWarning, match="one backward per sample"):
        fit("auto")
    with pytest.raises(UnsupportedModel):
        fit("batched")


@pytest.mark.parametrize("institution", ["university", "high_school", "online_tutor"])
def test_batched_per_sample_grads_equal_the_loop_when_routing_by_modality(institution):
    # The MoE layer routes each modality's tokens in their own router call; the batched
    # pass must route each sample's tokens of each source as that sample alone would,
    # with a capacity tight enough to drop tokens.
    inst, net, params, loss_of, batch = setup(institution, route_by_modality=True, router={"plugin": "topk", "options": {"k": 2, "capacity_factor": 0.5}})
    selected = net.expert_mask.nonzero().squeeze(1)
    assert not net.source_masks[:, selected].all()  # some source is restricted here
    fast = batched_per_sample_grads(net, loss_of, batch, params)
    assert_same(net, params, fast, loop_grads(net, loss_of, batch, params))
    assert not any("_route_by_source" in vars(m) for m in net.modules())  # the method is the class's again
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" keeps the batched path
        dp_sgd_fit(
            net, params, inst.data.train, loss_of, torch.optim.SGD(params, lr=0.0), 1, 1.0, 1.0, 0.5,
            RDPAccountant(), torch.Generator().manual_seed(0), per_sample="auto",
        )


def test_clipping_and_noise_act_on_the_batched_per_sample_grads():
    _, net, params, loss_of, batch = setup()
    grads = batched_per_sample_grads(net, loss_of, batch, params)
    B, clip = grads[0].shape[0], 1e-3
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads))
    assert (norms > clip).all()  # so every sample is clipped

    def clipped_step(sigma):
        opt = make_dp_optimizer(torch.optim.SGD(params, lr=1.0), sigma, clip, B, RDPAccountant(), 0.5, torch.Generator().manual_seed(1))
        for p, g in zip(params, grads):
            p.grad_sample = g.clone()  # Opacus marks the tensors it has used
        opt.pre_step()  # clip, sum, noise, scale by 1/B
        out = [p.grad.clone() for p in params]
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        return out

    # no noise: the update is the mean of per-sample gradients clipped to norm <= C
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (torch.sqrt(sum((g * factor.view(-1, *[1] * (g.dim() - 1))).flatten(1).pow(2).sum(1) for g in grads)) <= clip * (1 + 1e-5)).all()
    update = clipped_step(0.0)
    for g, u in zip(grads, update):
        assert torch.allclose(u, (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / B, atol=1e-8)
    assert float(torch.sqrt(sum(u.pow(2).sum() for u in update))) <= clip * (1 + 1e-5)
    # noise: Gaussian of std sigma * C / B on every coordinate
    noise = torch.cat([(n - u).flatten() for n, u in zip(clipped_step(2.0), update)])
    assert float(noise.std()) == pytest.approx(2.0 * clip / B, rel=0.05)


def test_dp_sgd_fit_trains_with_batched_per_sample_grads():
    inst, net, params, loss_of, _ = setup()
    before = [p.detach().clone() for p in params]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" must not fall back on the default model
        loss, counts = dp_sgd_fit(
            net, params, inst.data.train, loss_of, torch.optim.SGD(params, lr=0.1), 3, 0.5, 1.0, 0.5,
            RDPAccountant(), torch.Generator().manual_seed(0),
        )
    assert loss > 0 and int(counts.sum()) > 0
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    assert all(p.grad_sample is None and p.grad is None for p in params)


def test_a_proximal_pull_is_added_to_the_noisy_gradient_unclipped():
    """FedProx and Ditto under DP-SGD: mu (w - w0) joins the step after clipping and
    noise (it reads no data), so with the same noise the two runs differ by lr mu (w - w0)."""
    inst, net, params, loss_of, _ = setup()
    start = [p.detach().clone() for p in params]
    anchor = [w - 1.0 for w in start]  # w - w0 = 1 everywhere
    lr, mu = 0.1, 0.5

    def step(proximal):
        with torch.no_grad():
            for p, w in zip(params, start):
                p.copy_(w)
        dp_sgd_fit(
            net, params, inst.data.train, loss_of, torch.optim.SGD(params, lr=lr), 1, 1.0, 1e-3, 0.5,
            RDPAccountant(), torch.Generator().manual_seed(0), proximal=proximal,
        )  # fmt: skip
        return [p.detach().clone() for p in params]

    plain = step(())
    pulled = step([(p, w0, mu) for p, w0 in zip(params, anchor)])
    for a, b in zip(plain, pulled):
        assert torch.allclose(a - b, torch.full_like(a, lr * mu), atol=1e-6)


def test_the_query_bias_takes_a_fair_share_of_each_clipped_gradient():
    """The ``sequence`` encoder's per-id query bias trains faster through a learning-rate
    multiplier, not a forward scale: a forward scale of 300 multiplied its per-sample
    gradient by 300, and per-sample clipping then spent most of each sample's norm on it.
    Measured at initialisation (encoder + head, 16 next-response samples): its share of
    the clipped update is 5e-5 now, 0.57 with the old scale."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    net = torch.nn.ModuleDict({"enc": InteractionEncoder(16, num_skills=50, max_len=8), "head": torch.nn.Linear(16, 1)})
    B, clip = 16, 0.1
    batch = {
        "interactions": {
            "skill": torch.randint(0, 50, (B, 8), generator=g),
            "correct": torch.randint(0, 2, (B, 8), generator=g),
            "query_skill": torch.randint(0, 50, (B,), generator=g),
        },
        "targets": {"y": torch.randint(0, 2, (B,), generator=g).float()},
    }

    def loss(one):
        logit = net["head"](net["enc"](one["interactions"]).tokens[:, -1]).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logit, one["targets"]["y"])

    params = list(net.parameters())
    grads = per_sample_grads(loss, batch, params)
    bias = next(i for i, p in enumerate(params) if p is net["enc"].query_bias)

    def share_of_clipped_update(bias_grad_scale):
        opt = make_dp_optimizer(make_optimizer(net, params, 1.0, "sgd", 0.0), 0.0, clip, B, RDPAccountant(), 0.5)
        for i, (p, gs) in enumerate(zip(params, grads)):
            p.grad_sample = gs * (bias_grad_scale if i == bias else 1.0)
        opt.pre_step()  # clip each sample's gradient to norm <= clip, average (no noise)
        sq = [float(p.grad.pow(2).sum()) for p in params]
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        return sq[bias] / sum(sq)

    now, with_forward_scale = share_of_clipped_update(1.0), share_of_clipped_update(300.0)
    assert 0 < now < 1e-3 and with_forward_scale > 0.3, (now, with_forward_scale)
