"""Membership inference: does a trained model reveal who was in its training data?

The loss-threshold attack (Yeom et al. 2018): a sample whose loss is low was probably
trained on. Its AUC over members (an institution's train split) vs non-members (its
held-out split) is 0.5 when the model leaks nothing and 1.0 when it gives every member
away. DP-SGD bounds it: with (epsilon, delta)-DP no test can tell a member apart much
better than ``e^epsilon`` allows.

- :func:`attack_institution`: the attack on one institution's data and a trained
  federated model (for the job or a bench).
- :func:`mia_experiment`: a small, self-contained overfitting setup trained without DP
  and with Opacus DP-SGD at given epsilons, reporting the attack AUC of each.

Not here: stronger attacks (shadow models, LiRA); the loss threshold is the baseline
every defence must at least beat.
"""

from __future__ import annotations

from typing import Any

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from ..federation.data import eval_batches, model_inputs


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


def mia_experiment(epsilons: tuple[float | None, ...] = (None, 8.0, 1.0), n: int = 200, dim: int = 20, hidden: int = 128, steps: int = 300, batch_size: int = 20, lr: float = 0.05, clip_norm: float = 1.0, delta: float = 1e-5, seed: int = 0) -> dict[str, dict[str, float]]:
    """Train a small MLP on ``n`` random-label samples (pure memorization: the worst case
    for privacy) without DP (``None``) and with DP-SGD at each epsilon, then attack it.

    Returns ``{"no_dp" | "eps=<e>": {"auc", "epsilon", "noise_multiplier", "train_acc"}}``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, dim, generator=g)
    y = torch.randint(0, 2, (2 * n,), generator=g)
    (xm, ym), (xn, yn) = (x[:n], y[:n]), (x[n:], y[n:])
    results = {}
    for eps in epsilons:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
        q = batch_size / n
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=torch.Generator().manual_seed(seed + 1))
        sigma, spent = 0.0, 0.0
        if eps is None:
            model, opt = net, torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
        else:
            sigma = get_noise_multiplier(target_epsilon=eps, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp")
            model = GradSampleModule(net)
            accountant = RDPAccountant()
            opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), noise_multiplier=sigma, max_grad_norm=clip_norm, expected_batch_size=batch_size, generator=torch.Generator().manual_seed(seed + 2))
            opt.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=q))
        done = 0
        while done < steps:
            for idx in sampler:
                if done == steps:
                    break
                idx = torch.as_tensor(idx, dtype=torch.long)
                opt.zero_grad(set_to_none=True)
                if len(idx):
                    torch.nn.functional.cross_entropy(model(xm[idx]), ym[idx]).backward()
                elif eps is not None:  # empty Poisson batch: Opacus still takes a noise step
                    for p in model.parameters():
                        p.grad_sample = p.new_zeros((0, *p.shape))
                opt.step()
                done += 1
        if eps is not None:
            spent = accountant.get_epsilon(delta)
        with torch.no_grad():
            lm = torch.nn.functional.cross_entropy(model(xm), ym, reduction="none")
            ln = torch.nn.functional.cross_entropy(model(xn), yn, reduction="none")
            acc = float((model(xm).argmax(1) == ym).float().mean())
        results["no_dp" if eps is None else f"eps={eps:g}"] = {"auc": attack_auc(lm, ln), "epsilon": spent, "noise_multiplier": float(sigma), "train_acc": acc}
    return results
