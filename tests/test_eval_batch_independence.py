"""Evaluation does not depend on the batch: for every installed router, a sample's
prediction in eval mode is the same alone, in its batch, and in a shuffled batch."""

import pytest
import torch
from conftest import tiny_config_dict
from m3tfed import get_catalogue
from m3tfed.data import model_inputs, take
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config

# Tight capacities, so a router that limits capacity at evaluation would drop tokens.
TIGHT = {"topk": {"k": 2, "capacity_factor": 0.3}, "expert_choice": {"k": 2, "capacity_factor": 0.3}}


def predictions(router: str, train: bool):
    d = tiny_config_dict(n=40)
    d["model"]["router"] = {"plugin": router, "options": TIGHT.get(router, {})}
    fed = build_federation(load_config(d))
    inst = fed.institutions["community_college"]  # tabular + interactions + text, three tasks
    model = inst.load(fed.server.state)
    model.train(train)
    split = inst.data.val
    n = len(split["targets"]["grade"])
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    out = {}
    with torch.no_grad():
        for task in inst.config.tasks:
            batch = model(model_inputs(split), task).pred
            shuffled = torch.empty_like(batch)
            shuffled[perm] = model(model_inputs(take(split, perm)), task).pred
            alone = torch.cat([model(model_inputs(take(split, torch.tensor([i]))), task).pred for i in range(n)])
            out[task] = (batch, shuffled, alone)
    return out


@pytest.mark.parametrize("router", get_catalogue().names("router"))
def test_eval_prediction_is_the_same_alone_or_in_any_batch(router):
    for task, (batch, shuffled, alone) in predictions(router, train=False).items():
        assert torch.allclose(batch, alone, atol=1e-5, rtol=1e-4), (router, task)
        assert torch.allclose(batch, shuffled, atol=1e-5, rtol=1e-4), (router, task)


@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_training_routing_does_depend_on_the_batch(router):
    """What the eval test guards against is real: with capacity, training mode drops."""
    differs = [not torch.allclose(batch, alone, atol=1e-5, rtol=1e-4) for batch, _, alone in predictions(router, train=True).values()]
    assert any(differs)
