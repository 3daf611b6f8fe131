"""``centralized``: one model trained on the pooled data of every institution, with the
federation's total compute, in shuffled order: each round's steps (every institution's
local steps) are interleaved at random, so consecutive steps mix institutions and tasks.
A step's batch holds one institution's samples, because institutions' modality sets
differ. What an institution keeps personal in the federation (its router, its heads) it
keeps here too, with its own optimizer state, so this differs from the federation only
in where the data is. Early stopping: the pooled model is validated every
``evaluation.every`` rounds' worth of steps and the best state is the one tested."""

from __future__ import annotations

import copy

import torch

from ...data import iterate_batches, model_inputs
from ...model import M3TModel, component_of
from ..build import Federation
from ..institution import seed_for
from ..server import initial_state
from .base import BaselineContext, Results
from .common import val_loss


class Centralized:
    name = "centralized"

    def run(self, fed: Federation, ctx: BaselineContext) -> Results:
        ctx.progress("  centralized baseline: pooled data, same compute")
        cfg = fed.config
        torch.manual_seed(seed_for(cfg.seed, "centralized"))
        model = M3TModel(cfg.model, catalogue=fed.server.catalogue)
        init = initial_state(cfg, fed.server.catalogue)
        for comp, state in init.items():
            model.load_component_state(comp, state)
        insts = list(fed.institutions.values())
        f = cfg.federation

        def optimizer(tensors):
            if f.optimizer == "adamw":
                return torch.optim.AdamW(tensors, lr=f.lr, weight_decay=f.weight_decay)
            return torch.optim.SGD(tensors, lr=f.lr, weight_decay=f.weight_decay)

        shared_opt = optimizer([p for p in model.parameters() if p.requires_grad])
        personal = [[c for c in model.component_names() if inst.is_personal(c)] for inst in insts]
        own_state = [{c: {k: v.clone() for k, v in init[c].items()} for c in comps} for comps in personal]
        trainable = [(component_of(n), p) for n, p in model.named_parameters() if p.requires_grad]
        own_opt = [optimizer([p for c, p in trainable if c in comps]) if comps else None for comps in personal]
        gen = torch.Generator().manual_seed(seed_for(cfg.seed, "centralized", "batches"))
        batches = [iterate_batches(i.data.train, f.batch_size, gen) for i in insts]
        # Interleave in proportion to each institution's local steps, as the federation does.
        schedule = torch.tensor([k for k, inst in enumerate(insts) for _ in range(inst.local_steps())])
        best, kept, curve = float("inf"), None, []
        for rnd in range(1, cfg.rounds + 1):
            model.train()
            for k in schedule[torch.randperm(len(schedule), generator=gen)].tolist():
                shared_values = {c: model.component_state(c) for c in personal[k]}
                for c in personal[k]:
                    model.load_component_state(c, own_state[k][c])
                batch = next(batches[k])
                loss = sum(model.loss(model_inputs(batch), t, batch["targets"][t])[0] for t in insts[k].config.tasks)
                shared_opt.zero_grad(set_to_none=True)
                loss.backward()
                if own_opt[k] is not None:
                    own_opt[k].step()
                    own_opt[k].zero_grad(set_to_none=True)  # the shared optimizer leaves them be
                shared_opt.step()
                for c in personal[k]:
                    own_state[k][c] = model.component_state(c)
                    model.load_component_state(c, shared_values[c])
            if rnd % cfg.evaluation.every and rnd != cfg.rounds:
                continue
            score = sum(with_own(model, personal[k], own_state[k], lambda inst=inst: val_loss(inst, model)) for k, inst in enumerate(insts)) / len(insts)
            curve.append({"round": rnd, "val_loss": score})
            if score < best:
                best = score
                kept = ({c: model.component_state(c) for c in model.component_names()}, copy.deepcopy(own_state))
        shared_state, own_state = kept
        for c, s in shared_state.items():
            model.load_component_state(c, s)
        ctx.curves[self.name] = curve
        return {inst.name: with_own(model, personal[k], own_state[k], lambda inst=inst: ctx.final.evaluate(self.name, inst, model)[0]) for k, inst in enumerate(insts)}


def with_own(model: M3TModel, comps: list[str], own: dict, read):
    """``read()`` with an institution's own values of its personal components loaded."""
    shared_values = {c: model.component_state(c) for c in comps}
    for c in comps:
        model.load_component_state(c, own[c])
    try:
        return read()
    finally:
        for c in comps:
            model.load_component_state(c, shared_values[c])
