"""The models a tuning run scored, kept so the first seed reads test from them.

A tuning run (``run_seeds`` with ``evaluation.grid``) trains every deep method at one
grid point on the first seed and scores the state each keeps on validation. The first
seed's run at each method's chosen point would train exactly that again, so instead the
tuning run writes what it scored (``tested/<method>``: each institution's model, as its
build selection and trainable tensors) and, once every method has chosen its point on
validation, the first seed reads test from the chosen point's states: the same numbers,
one training fewer per method. Test is still read once, after the choice.

Frozen tensors (a pretrained backbone) are not written: the model is built again from
its config, which loads them, and their SHA-256 recorded at save time must match, so a
state is never read into a model whose frozen part differs.

Not for: resuming a run (:mod:`.checkpoint` round checkpoints) or the kept round of the
federated MoE (``run_dir/kept``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict, to_dict
from ..errors import CheckpointError
from ..model import InterpolatedModel, M3TModel, ModelConfig
from .build import Federation
from .checkpoint import (
    join_owners,
    load_checkpoint,
    save_checkpoint,
    split_owners,
    unflatten_components,
)
from .evaluation import FinalTest, Metrics
from .institution import Institution

TESTED = "tested"  # run_dir/tested/<method>: the states a tuning run scored

Scored = dict[str, dict[str, tuple[M3TModel | InterpolatedModel, dict[str, dict[str, torch.Tensor]]]]]  # method -> institution -> (model, state)


def frozen_sha256(model: M3TModel) -> str:
    """One hash of every frozen (not trained) tensor of ``model``, by name."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if not p.requires_grad:
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_scored(scored: Scored, run_dir: Path) -> None:
    """Write each method's scored models under ``run_dir/tested/<method>``."""
    for method, by_inst in scored.items():
        models: list[dict[str, Any]] = []
        index: dict[int, int] = {}  # id(model) -> its entry in models
        institutions: dict[str, int] = {}
        mix: dict[str, float] = {}  # institution -> its interpolation's weight (personal_serve = "mix")
        for name, (model, _) in by_inst.items():
            if isinstance(model, InterpolatedModel):
                model, mix[name] = model.federation, model.weight  # its state holds both parts
            if id(model) not in index:
                index[id(model)] = len(models)
                models.append({"config": to_dict(model.config), "selection": model.selection, "frozen_sha256": frozen_sha256(model)})
            institutions[name] = index[id(model)]
        tensors = join_owners({name: state for name, (_, state) in by_inst.items()})
        save_checkpoint(Path(run_dir) / TESTED / method, tensors, {"method": method, "models": models, "institutions": institutions, "mix": mix})


def read_test_from(fed: Federation, tuning_run: Path, method: str, final: FinalTest) -> tuple[dict[str, Metrics], dict[str, dict]]:
    """Every institution's test metrics (and routing) for ``method``, read through
    ``final`` from the models the tuning run ``tuning_run`` scored."""
    where = Path(tuning_run) / TESTED / method
    tensors, meta = load_checkpoint(where)
    owners = split_owners(tensors)
    missing = sorted(set(fed.institutions) - set(meta["institutions"]))
    if missing:
        raise CheckpointError(f"{where}: no state for institution(s) {', '.join(missing)}")
    models: dict[tuple[int, bool], M3TModel] = {}  # (entry of meta["models"], second) -> the model built for it
    metrics, routing = {}, {}

    def built(k: int, inst: Institution, second: bool = False) -> M3TModel:
        if (k, second) not in models:
            spec = meta["models"][k]
            # in the scored model's own module order (a pool's would sort it): the same
            # sums; with the institutions' frozen tensors and accelerator
            model = M3TModel(from_dict(ModelConfig, spec["config"]), **spec["selection"], catalogue=fed.server.catalogue)
            models[k, second] = model = inst.pool.prepare(model)
            if frozen_sha256(model) != spec["frozen_sha256"]:
                raise CheckpointError(f"{where}: {inst.name}'s model has other frozen weights than the one the tuning run scored")
        models[k, second].wide_stats = inst.wide_stats
        return models[k, second]

    for name, inst in fed.institutions.items():
        k = meta["institutions"][name]
        model: M3TModel | InterpolatedModel = built(k, inst)
        if name in meta.get("mix", {}):
            model = InterpolatedModel(model, built(k, inst, second=True), meta["mix"][name])
        state = unflatten_components(owners.get(name, {}))
        if missing := sorted(set(model.component_names()) - set(state)):
            raise CheckpointError(f"{where}: no state for {name}'s component(s) {', '.join(missing)}")
        model.load_trainable_state(state)
        metrics[name], routing[name] = final.evaluate(method, inst, model)
    return metrics, routing
