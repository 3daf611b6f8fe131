"""Plain local training, and what every local trainer shares: the optimizer an
institution trains with and its moments kept between rounds.

:class:`PlainTrainer` is the :class:`~m3tfed.interfaces.LocalTrainer` of an institution
without sample-level DP and without DeepSpeed: mini-batches of its training split, the
sum of its task losses, optional FedProx term. It sits below the privacy layer so that
DP-SGD (:class:`m3tfed.privacy.dpsgd.DPSGDTrainer`) builds its optimizer the same way.

Not here: DP-SGD (``privacy/dpsgd.py``), DeepSpeed ranks (``federation/zero.py``),
which trainer an institution uses (``Institution``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from .data import iterate_batches, model_inputs
from .errors import InstitutionTimeout
from .interfaces import LocalFit, LocalRun
from .model import M3TModel, component_of

if TYPE_CHECKING:  # annotations only: the federation layer sits above this module
    from .federation.config import FederationSettings
    from .federation.institution import Institution


def make_optimizer(
    params: list[torch.nn.Parameter], lr: float, settings: FederationSettings
) -> torch.optim.Optimizer:
    """The optimizer ``federation.optimizer`` names, over ``params``."""
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=settings.weight_decay)
    return torch.optim.SGD(params, lr=lr, weight_decay=settings.weight_decay)


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
        opt = make_optimizer([p for _, p in trainable], run.lr, s)
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
