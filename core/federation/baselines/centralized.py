"""``centralized``: one model trained on the pooled data of every institution, with the
federation's compute, on shuffled mixed-institution, mixed-task batches: the upper
bound the federation is compared with.

A step's batch mixes the samples of :data:`MIX` institutions drawn at random (in
proportion to their local steps, as the federation weighs them), so their tasks and
modality sets differ within one step. Institutions' modality sets differ, so the batch
is formed as micro-batches, one per drawn institution, whose gradients are accumulated
(each weighted by its share of the batch's samples) before the one optimizer step: the
step's gradient is the gradient of the mixed batch's mean loss. A micro-batch is a
federation batch (``federation.batch_size`` samples) and a round takes 1/MIX of the
federation's steps: the same samples and the same forward passes per round as the
institutions take together, in steps of MIX times the batch. (Micro-batches of
batch_size/MIX took 2.2x the federation's time for the same samples, small passes being
dearer per sample, and reached about the same validation loss: docs/results.md.)

What an institution keeps personal in the federation (its router, its heads) it keeps
here too, with its own optimizer state, so this differs from the federation without
personal models (``federation.personal_model = "none"``) only in where the data is. Early stopping: the pooled model is validated every
``evaluation.every`` rounds' worth of steps, with its average over rounds
(``evaluation.average``) as the federation's state is, and the best state is the one
tested."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from ...data import iterate_batches, model_inputs
from ...model import M3TModel, component_of
from ...training import make_optimizer
from ..build import Federation
from ..evaluation import exponential_average, lower, lower_of
from ..institution import seed_for
from ..server import initial_state
from .base import BaselineContext, Results
from .common import federation_at

MIX = 4  # institutions per step (fewer when the federation has fewer)


class PooledTrainer:
    """The pooled model, its optimizers and each institution's own personal values."""

    def __init__(self, fed: Federation):
        cfg = fed.config
        torch.manual_seed(seed_for(cfg.seed, "centralized"))
        self.model = model = M3TModel(cfg.model, catalogue=fed.server.catalogue)
        init = initial_state(cfg, fed.server.catalogue)
        for comp, state in init.items():
            model.load_component_state(comp, state)
        self.insts = insts = list(fed.institutions.values())
        f = cfg.federation

        def optimizer(tensors):
            return make_optimizer(model, tensors, f.lr, f.optimizer, f.weight_decay)

        self.shared_opt = optimizer([p for p in model.parameters() if p.requires_grad])
        self.personal = [
            [c for c in model.component_names() if inst.is_personal(c)] for inst in insts
        ]
        self.own_state = [
            {c: {k: v.clone() for k, v in init[c].items()} for c in comps}
            for comps in self.personal
        ]
        self.params = [(component_of(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.own_opt = [
            optimizer([p for c, p in self.params if c in comps]) if comps else None
            for comps in self.personal
        ]

    def step(self, parts: list[tuple[int, dict]]) -> None:
        """One optimizer step on a mixed batch given as ``(institution index, micro-batch)``
        parts: each part's loss (its institution's tasks, with its own personal values)
        weighted by its share of the samples, gradients accumulated, then one step of the
        shared parameters and of each drawn institution's personal ones."""
        model, total = self.model, sum(num_rows(b) for _, b in parts)
        model.train()
        self.shared_opt.zero_grad(set_to_none=True)
        own_grads: dict[int, dict[torch.Tensor, torch.Tensor]] = {}
        for k, batch in parts:
            # A personal part's gradient is its institution's alone; what other parts
            # accumulated there so far is the shared values' gradient and stays theirs.
            mine = [p for c, p in self.params if c in self.personal[k]]
            shared_grads = {p: p.grad for p in mine}
            for p in mine:
                p.grad = None
            with self.own_values(k):
                loss = sum(
                    model.loss(model_inputs(batch), t, batch["targets"][t])[0]
                    for t in self.insts[k].config.tasks
                )
                (loss * (num_rows(batch) / total)).backward()
            grads = own_grads.setdefault(k, {})
            for p in mine:
                if p.grad is not None:
                    grads[p] = grads[p] + p.grad if p in grads else p.grad
                p.grad = shared_grads[p]
        self.shared_opt.step()  # a parameter without gradient (personal to every part) stays
        for k, grads in own_grads.items():
            if self.own_opt[k] is None:
                continue
            with self.own_values(k, keep=True):
                for p, g in grads.items():
                    p.grad = g
                self.own_opt[k].step()
                self.own_opt[k].zero_grad(set_to_none=True)

    @contextmanager
    def own_values(self, k: int, keep: bool = False):
        """Institution ``k``'s own values of its personal components loaded in the pooled
        model for the block (``keep``: what the block changed becomes its own values),
        and its wide statistics (``wide_scale = "local"``: its own split's, as in the federation)."""
        self.model.wide_stats = self.insts[k].wide_stats
        comps = self.personal[k]
        shared_values = {c: self.model.component_state(c) for c in comps}
        for c in comps:
            self.model.load_component_state(c, self.own_state[k][c])
        try:
            yield
        finally:
            for c in comps:
                if keep:
                    self.own_state[k][c] = self.model.component_state(c)
                self.model.load_component_state(c, shared_values[c])

    def read(self, k: int, read):
        """``read()`` with institution ``k``'s own personal values loaded."""
        with self.own_values(k):
            return read()

    def validation_score(self) -> float:
        """The mean over institutions of their validation loss, each with its own values."""
        return sum(self.read(k, lambda inst=inst: inst.validation_loss(self.model)) for k, inst in enumerate(self.insts)) / len(self.insts)


def num_rows(batch: dict) -> int:
    return len(next(iter(batch["targets"].values())))


class Centralized:
    name = "centralized"
    cost = 1.1  # the federation's forward passes, plus swapping personal values
    after = None

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        ctx.progress("  centralized baseline: pooled data, mixed-institution batches, same compute")
        fed = federation_at(fed, self.name)  # at the method's learning rate and local steps
        cfg, f = fed.config, fed.config.federation
        pooled = PooledTrainer(fed)
        insts = pooled.insts
        mix = min(MIX, len(insts))
        gen = torch.Generator().manual_seed(seed_for(cfg.seed, "centralized", "batches"))
        batches = [iterate_batches(i.data.train, f.batch_size, gen) for i in insts]
        # Institutions are drawn in proportion to their local steps, as the federation weighs them.
        weights = torch.tensor([float(inst.local_steps()) for inst in insts])
        # The federation's batches per round, MIX to a step.
        steps = max(1, round(sum(inst.local_steps() for inst in insts) / mix))
        best, kept, curve, average = float("inf"), None, [], None
        for rnd in range(1, cfg.rounds + 1):
            for _ in range(steps):
                drawn = torch.multinomial(weights, mix, replacement=False, generator=gen).tolist()
                pooled.step([(k, next(batches[k])) for k in drawn])
            current = pooled.model.trainable_state()
            if beta := cfg.evaluation.average:  # the pooled model averaged over rounds, as the server's state is
                average = exponential_average(average, current, beta)
            if rnd % cfg.evaluation.every and rnd != cfg.rounds:
                continue
            score, state = lower_of(pooled.model, current, average if rnd > 1 else None, pooled.validation_score)
            curve.append({"round": rnd, "val_loss": score})
            ctx.progress(f"  centralized: round {rnd}/{cfg.rounds}, val loss {score:.4f}")
            if kept is None or lower(score, best):  # a NaN score (diverged) is never the lower
                best, kept = score, (state, copy.deepcopy(pooled.own_state))
        shared_state, pooled.own_state = kept
        pooled.model.load_trainable_state(shared_state)
        ctx.curves[self.name] = curve
        return {
            inst.name: pooled.read(
                k, lambda inst=inst: ctx.final.evaluate(self.name, inst, pooled.model)[0]
            )
            for k, inst in enumerate(insts)
        }
