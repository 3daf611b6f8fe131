"""Learning-rate multipliers (m3tfed.LearningRateMultipliers): a model part declares that
some of its parameters train at a multiple of the local learning rate; every trainer's
optimizer (m3tfed.training.make_optimizer) puts them in a group of their own. The
``sequence`` encoder's query bias uses it instead of a forward-pass scale."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config_dict
from m3tfed import LearningRateMultipliers
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugins.encoders.sequence import QUERY_BIAS_LR_MULTIPLIER, InteractionEncoder
from m3tfed.training import (
    load_optimizer_state,
    lr_multipliers,
    make_optimizer,
    save_optimizer_state,
)
from torch import nn


def encoder_and_head(seed: int = 0) -> nn.ModuleDict:
    torch.manual_seed(seed)
    return nn.ModuleDict(
        {"enc": InteractionEncoder(16, num_skills=50, max_len=8), "head": nn.Linear(16, 1)}
    )


def next_response_batch(seed: int, size: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = {
        "skill": torch.randint(0, 50, (size, 8), generator=g),
        "correct": torch.randint(0, 2, (size, 8), generator=g),
        "query_skill": torch.randint(0, 50, (size,), generator=g),
    }
    return x, torch.randint(0, 2, (size,), generator=g).float()


def next_response_loss(
    net: nn.ModuleDict, x: dict[str, torch.Tensor], y: torch.Tensor
) -> torch.Tensor:
    logit = net["head"](net["enc"](x).tokens[:, -1]).squeeze(-1)
    return F.binary_cross_entropy_with_logits(logit, y)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_the_query_bias_multiplier_reaches_the_optimizers_param_groups(kind):
    net = encoder_and_head()
    assert isinstance(net["enc"], LearningRateMultipliers)
    assert (
        lr_multipliers(net)
        == {"enc.query_bias": QUERY_BIAS_LR_MULTIPLIER}
        == {"enc.query_bias": 300.0}
    )
    opt = make_optimizer(net, net.parameters(), 3e-3, kind, 0.01)
    assert type(opt) is {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[kind]
    rest, fast = opt.param_groups
    assert rest["lr_multiplier"] == 1.0 and rest["lr"] == pytest.approx(3e-3)
    assert rest["weight_decay"] == pytest.approx(0.01)
    assert fast["lr_multiplier"] == 300.0 and fast["params"] == [net["enc"].query_bias]
    assert fast["lr"] == pytest.approx(0.9) and fast["weight_decay"] == pytest.approx(0.01 / 300)
    # every trainable parameter exactly once
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(list(net.parameters())) and len(set(map(id, grouped))) == len(
        grouped
    )
    # only the parameters asked for: an optimizer over the head alone has one group
    only_head = make_optimizer(net, net["head"].parameters(), 3e-3, kind, 0.0)
    assert [g["lr_multiplier"] for g in only_head.param_groups] == [1.0]
    # without the option nothing is declared
    assert lr_multipliers(InteractionEncoder(16, num_skills=50, query_bias=False)) == {}


def test_every_trainer_builds_its_optimizer_with_the_declared_multipliers(monkeypatch):
    import m3tfed.privacy.dpsgd as dpsgd_module
    import m3tfed.training as training_module

    built: dict[str, list[float]] = {}

    def spy(name, make):
        def wrapped(model, params, lr, optimizer, weight_decay):
            opt = make(model, params, lr, optimizer, weight_decay)
            built[name] = sorted(g["lr"] / lr for g in opt.param_groups)
            return opt

        return wrapped

    monkeypatch.setattr(
        training_module, "make_optimizer", spy("plain", training_module.make_optimizer)
    )
    monkeypatch.setattr(dpsgd_module, "make_optimizer", spy("dp_sgd", dpsgd_module.make_optimizer))
    d = tiny_config_dict(rounds=1)
    tutor = next(i for i in d["institutions"] if i["name"] == "online_tutor")
    tutor["policy"] = {"dp": "sample", "epsilon": 50.0, "noise_multiplier": 0.5, "clip_norm": 1.0}
    fed = build_federation(load_config(d))
    for name in ("university", "online_tutor"):  # both have interaction logs
        fed.institutions[name].train(fed.server.make_job(name, 1, 0))
    assert built == {"plain": [1.0, pytest.approx(300.0)], "dp_sgd": [1.0, pytest.approx(300.0)]}


def test_a_multiplier_steps_like_a_forward_scale_under_adamw_but_not_its_square_under_sgd():
    """A parameter used as ``s * a`` in the forward pass against one used as ``b`` with
    multiplier ``s``, both starting at 0 (the query bias's initialisation), same loss."""
    s, lr, target = 300.0, 1e-3, torch.tensor([0.7, -1.2, 2.0])

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(3))

        def lr_multipliers(self):
            return {"b": s}

    def effective_after(kind, forward_scale, steps, weight_decay=0.0):
        m = nn.Module() if forward_scale else Scaled()
        if forward_scale:
            m.b = nn.Parameter(torch.zeros(3))
        scale = s if forward_scale else 1.0
        opt = make_optimizer(m, m.parameters(), lr, kind, weight_decay)
        for _ in range(steps):
            loss = (scale * m.b - target).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return scale * m.b.detach()

    for wd in (0.0, 0.5):  # weight decay per step is lr * wd for both
        old, new = effective_after("adamw", True, 50, wd), effective_after("adamw", False, 50, wd)
        assert float(new.abs().min()) > 0.1  # it moved
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-5)
    # SGD: one step from 0 moves s * a by s**2 * lr * grad, b by s * lr * grad
    old, new = effective_after("sgd", True, 1), effective_after("sgd", False, 1)
    torch.testing.assert_close(new, s * lr * 2 * target)
    torch.testing.assert_close(old, s * s * lr * 2 * target)


def test_bad_declarations_are_named():
    class Typo(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.w, self.m = nn.Parameter(torch.zeros(2)), m

        def lr_multipliers(self):
            return {"w" if self.m != "typo" else "v": self.m if self.m != "typo" else 2.0}

    with pytest.raises(ValueError, match=r"Typo.lr_multipliers\(\) names 'v'"):
        lr_multipliers(nn.Sequential(Typo("typo")))
    for bad in (0.0, -1.0, float("inf"), "3"):
        with pytest.raises(
            ValueError, match=r"Typo.lr_multipliers\(\)\['w'\] must be a finite number > 0"
        ):
            lr_multipliers(Typo(bad))
    with pytest.raises(ValueError, match="federation.optimizer must be 'adamw' or 'sgd'"):
        make_optimizer(Typo(2.0), [], 1e-3, "adam", 0.0)


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_persisted_optimizer_state_round_trips_with_param_groups(kind):
    """``federation.optimizer_state = "persist"``: k steps, state saved by name, a fresh
    optimizer loads it, k more steps == 2k steps with one optimizer."""

    def train(net, opt, seeds):
        for seed in seeds:
            loss = next_response_loss(net, *next_response_batch(seed))
            opt.zero_grad()
            loss.backward()
            opt.step()

    def optimizer(net):
        if kind == "adamw":
            return make_optimizer(net, net.parameters(), 3e-3, "adamw", 0.01)
        opt = make_optimizer(net, net.parameters(), 1e-2, "sgd", 0.01)
        for g in opt.param_groups:
            g["momentum"] = 0.9  # so that SGD has per-parameter state to keep
        return opt

    one = encoder_and_head()
    opt = optimizer(one)
    train(one, opt, range(6))

    two = encoder_and_head()
    named = list(two.named_parameters())
    first = optimizer(two)
    train(two, first, range(3))
    saved = save_optimizer_state(first, named)
    assert "enc.query_bias/" + ("exp_avg" if kind == "adamw" else "momentum_buffer") in saved
    second = optimizer(two)
    load_optimizer_state(second, named, saved)
    assert save_optimizer_state(second, named).keys() == saved.keys()
    assert [g["lr_multiplier"] for g in second.param_groups] == [1.0, 300.0]
    # and torch's own state dict of the grouped optimizer loads into a fresh one
    third = optimizer(encoder_and_head())
    third.load_state_dict(second.state_dict())
    train(two, second, range(3, 6))
    for (n, a), b in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(a, b, msg=n)
    assert float(one["enc"].query_bias.detach().abs().max()) > 0.01  # it trained
