"""Membership inference: does a trained model reveal who was in its training data?

The loss-threshold attack (Yeom et al. 2018): a sample whose loss is low was probably
trained on. Its AUC over members (an institution's train split) vs non-members (its
held-out split) is 0.5 when the model leaks nothing and 1.0 when it gives every member
away. DP-SGD bounds it: with (epsilon, delta)-DP no test can tell a member apart much
better than ``e^epsilon`` allows.

- :func:`attack_institution`: the attack on one institution's data and a trained
  federated model (for the job or a bench).
- :func:`mia_experiment`: one institution of a real federation attacked after the run
  was trained without DP and with sample-level DP-SGD (``dpsgd.py``) at given epsilons.

It lives in the federation layer because the experiment builds and runs whole
federations; the privacy layer below it holds the defences it measures.

Not here: stronger attacks (shadow models, LiRA); the loss threshold is the baseline
every defence must at least beat.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ..config import to_dict
from ..data import eval_batches, model_inputs
from ..errors import ConfigError
from .build import build_federation
from .config import load_config


def attack_auc(member_losses: torch.Tensor, non_member_losses: torch.Tensor) -> float:
    """AUC of the score ``-loss`` separating members from non-members (Mann-Whitney U,
    ties counted half)."""
    m, n = member_losses.double().flatten(), non_member_losses.double().flatten()
    if not len(m) or not len(n):
        raise ValueError(f"need members and non-members, got {len(m)} and {len(n)}")
    lower = (m.unsqueeze(1) < n.unsqueeze(0)).double().sum()
    ties = (m.unsqueeze(1) == n.unsqueeze(0)).double().sum()
    return float((lower + 0.5 * ties) / (len(m) * len(n)))


@torch.no_grad()
def sample_losses(model, split: dict[str, Any], tasks: list[str], batch_size: int = 64) -> torch.Tensor:
    """Each sample's loss under ``model``, summed over ``tasks`` (one forward per sample
    batch; the head's loss on a one-sample slice)."""
    model.eval()
    out = []
    for batch in eval_batches(split, batch_size):
        inputs = model_inputs(batch)
        per = torch.zeros(len(next(iter(batch["targets"].values()))))
        for task in tasks:
            pred = model(inputs, task).pred
            head = model.tasks[task].head
            target = batch["targets"][task]
            per += torch.stack([head.loss(pred[i : i + 1], target[i : i + 1]).detach() for i in range(len(per))])
        out.append(per)
    model.train()
    return torch.cat(out)


def attack_institution(inst, model) -> dict[str, float]:
    """Loss-threshold attack on one institution: members = its train split, non-members =
    its held-out split. Returns the AUC and the mean losses."""
    members = sample_losses(model, inst.data.train, inst.config.tasks)
    others = sample_losses(model, inst.data.test, inst.config.tasks)
    return {"auc": attack_auc(members, others), "member_loss": float(members.mean()), "non_member_loss": float(others.mean()), "members": len(members), "non_members": len(others)}


def mia_experiment(config, institution: str, epsilons: tuple[float | None, ...] = (None, 8.0, 1.0), delta: float = 1e-5, clip_norm: float = 1.0, reproducible_noise: bool = False) -> dict[str, dict[str, Any]]:
    """Train the federation ``config`` once per entry of ``epsilons`` and attack
    ``institution`` in the final global model (with its personal parts).

    ``None`` trains it without DP; a number gives that institution sample-level DP-SGD
    (policy ``dp = "sample"``) with that epsilon budget for the whole run. Every other
    institution keeps its own policy, and every run sees the same data and seeds, so the
    runs differ only in how the attacked institution trains. ``reproducible_noise`` seeds
    its DP-SGD noise and sampling from the run seed (tests only: see the policy field).

    Returns ``{"no_dp" | "eps=<e>": {"auc", "member_loss", "non_member_loss", "members",
    "non_members", "epsilon" (spent), "epsilon_budget", "noise_multiplier"}}``."""
    base = to_dict(load_config(config))
    names = [i["name"] for i in base["institutions"]]
    if institution not in names:
        raise ConfigError("institutions", f"no institution named {institution!r} to attack; the config has {', '.join(names)}")
    results: dict[str, dict[str, Any]] = {}
    data = None
    for eps in epsilons:
        d = copy.deepcopy(base)
        inst_cfg = d["institutions"][names.index(institution)]
        inst_cfg["policy"] = {"dp": "none"} if eps is None else {"dp": "sample", "epsilon": eps, "delta": delta, "clip_norm": clip_norm, "reproducible_noise": reproducible_noise}
        fed = build_federation(load_config(d), data=data)
        data = {n: i.data for n, i in fed.institutions.items()}  # the same students in every run
        for rnd in range(1, fed.config.rounds + 1):
            fed.server.run_round(rnd)
        inst = fed.institutions[institution]
        out: dict[str, Any] = attack_institution(inst, inst.load(fed.server.state))
        priv = inst.privacy
        out["epsilon"] = priv.epsilon() if priv is not None else None
        out["epsilon_budget"] = eps
        out["noise_multiplier"] = priv.noise_multiplier if priv is not None else 0.0
        results["no_dp" if eps is None else f"eps={eps:g}"] = out
    return results
