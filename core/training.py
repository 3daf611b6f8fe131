"""Plain local training, and what every local trainer shares: the optimizer an
institution trains with (with the learning-rate multipliers its model's parts declare)
and its moments kept between rounds.

:class:`PlainTrainer` is the :class:`~m3tfed.interfaces.LocalTrainer` of an institution
without sample-level DP and without DeepSpeed: mini-batches of its training split, the
sum of its task losses, optional FedProx term. It sits below the privacy layer so that
DP-SGD (:class:`m3tfed.privacy.dpsgd.DPSGDTrainer`) builds its optimizer the same way.

Not here: DP-SGD (``privacy/dpsgd.py``), DeepSpeed ranks (``federation/zero.py``),
which trainer an institution uses (``Institution``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .data import iterate_batches, model_inputs
from .errors import InstitutionTimeout
from .interfaces import LearningRateMultipliers, LocalFit, LocalRun
from .model import M3TModel, component_of

if TYPE_CHECKING:  # annotations only: the federation layer sits above this module
    from .federation.institution import Institution


def lr_multipliers(model: nn.Module) -> dict[str, float]:
    """``{parameter name in model: multiplier}`` for every parameter a part of ``model``
    declares (:class:`~m3tfed.interfaces.LearningRateMultipliers`); others train at 1."""
    out: dict[str, float] = {}
    for prefix, module in model.named_modules():
        if not isinstance(module, LearningRateMultipliers):
            continue
        own = dict(module.named_parameters())
        for name, m in module.lr_multipliers().items():
            where = f"{type(module).__name__}.lr_multipliers()"
            if name not in own:
                raise ValueError(f"{where} names {name!r}, which is not one of its parameters")
            if not (isinstance(m, int | float) and math.isfinite(m) and m > 0):
                raise ValueError(f"{where}[{name!r}] must be a finite number > 0, got {m!r}")
            full = f"{prefix}.{name}" if prefix else name
            if out.get(full, m) != m:
                raise ValueError(f"{where}[{name!r}]: {full!r} already has multiplier {out[full]}")
            out[full] = float(m)
    return out


def make_optimizer(
    model: nn.Module,
    params: Iterable[nn.Parameter],
    lr: float,
    optimizer: str,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """The optimizer ``federation.optimizer`` names (``"adamw"`` or ``"sgd"``) over
    ``params`` (parameters of ``model``), at ``lr``. A parameter with a learning-rate
    multiplier ``m`` (:func:`lr_multipliers`) is in a parameter group at ``lr * m`` and
    ``weight_decay / m``: torch multiplies the decay by the group's learning rate, so its
    decay per step stays ``lr * weight_decay`` like every other parameter's. Each group
    records its ``lr_multiplier``."""
    if optimizer not in ("adamw", "sgd"):
        raise ValueError(f"federation.optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
    scaled = lr_multipliers(model)
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups: dict[float, list[nn.Parameter]] = {1.0: []}
    for p in params:
        groups.setdefault(scaled.get(name_of.get(id(p), ""), 1.0), []).append(p)
    param_groups = [
        {"params": ps, "lr": lr * m, "weight_decay": weight_decay / m, "lr_multiplier": m}
        for m, ps in groups.items()
        if ps
    ]
    if optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(param_groups, lr=lr, weight_decay=weight_decay)


def timeout(institution: Institution) -> InstitutionTimeout:
    return InstitutionTimeout(
        f"{institution.name} ran past its time limit of {institution.settings.timeout_s}s"
    )


def tokens_by_expert(model: M3TModel, counts: torch.Tensor | None) -> dict[str, int]:
    """``{expert name: tokens}`` from per-expert counts, experts no token reached left out."""
    if counts is None:
        return {}
    return {name: int(c) for name, c in zip(model.expert_names, counts.tolist()) if c}


class PlainTrainer:
    """Mini-batch training in this process over all of the institution's tasks; honours
    every field of :class:`~m3tfed.interfaces.LocalRun`."""

    name = "plain"
    keeps_optimizer_state = True

    def fit(self, institution: Institution, model: M3TModel, run: LocalRun) -> LocalFit:
        s = institution.settings
        accelerator = institution.pool.accelerator
        torch.manual_seed(run.seed)
        gen = torch.Generator().manual_seed(run.seed)
        only = run.only
        trainable = [
            (n, p)
            for n, p in model.named_parameters()
            if p.requires_grad and (only is None or only(component_of(n)))
        ]
        opt = make_optimizer(model, [p for _, p in trainable], run.lr, s.optimizer, s.weight_decay)
        if run.optimizer_state is not None:
            load_optimizer_state(opt, trainable, run.optimizer_state)
        prox = proximal_terms(model, run)
        model.train()
        batches = iterate_batches(institution.data.train, s.batch_size, gen)
        counts = torch.zeros(len(model.expert_names), dtype=torch.long)
        total = 0.0
        for _ in range(run.steps):
            if run.deadline is not None and time.perf_counter() > run.deadline:
                raise timeout(institution)
            batch = next(batches)
            inputs = model_inputs(batch)
            loss = torch.zeros(())
            for task in institution.config.tasks:
                task_loss, out = model.loss(inputs, task, batch["targets"][task])
                loss = loss + task_loss
                counts += out.tokens_per_expert
            for p, w0, mu in prox:
                loss = loss + 0.5 * mu * (p - w0).pow(2).sum()
            opt.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            opt.step()
            total += float(loss.detach())
        if run.optimizer_state is not None:
            run.optimizer_state.update(save_optimizer_state(opt, trainable))
        return LocalFit(total / max(run.steps, 1), tokens_by_expert(model, counts))


def proximal_terms(model: M3TModel, run: LocalRun) -> list[tuple[torch.nn.Parameter, torch.Tensor, float]]:
    """(parameter, anchor value, mu) for each parameter of a component ``run`` pulls
    toward its anchor (FedProx's mu/2 ||w - w0||^2; Ditto's pull to the global model)."""
    if not (run.anchor and run.proximal_mu):
        return []
    named = dict(model.named_parameters())
    return [
        (named[n], w0, mu)
        for comp, mu in run.proximal_mu.items()
        if mu > 0 and comp in run.anchor
        for n, w0 in run.anchor[comp].items()
    ]


def save_optimizer_state(
    opt: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]]
) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as ``"<parameter name>/<state key>" -> tensor``
    (AdamW: step, exp_avg, exp_avg_sq): keyed by name, because the model object is shared
    by every institution with the same selection and outlives no optimizer."""
    return {
        f"{n}/{k}": v.detach().clone()
        for n, p in named
        for k, v in opt.state.get(p, {}).items()
        if isinstance(v, torch.Tensor)
    }


def load_optimizer_state(
    opt: torch.optim.Optimizer,
    named: list[tuple[str, torch.nn.Parameter]],
    saved: dict[str, torch.Tensor],
) -> None:
    """Give ``opt`` the state :func:`save_optimizer_state` kept for each parameter
    (parameters without saved state start fresh)."""
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in saved.items():
        name, _, k = key.rpartition("/")
        by_param.setdefault(name, {})[k] = v.clone()
    for n, p in named:
        if n in by_param:
            opt.state[p] = by_param[n]
