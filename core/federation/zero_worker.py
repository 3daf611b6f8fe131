"""One DeepSpeed rank of an institution's sharded local training (``python -m``).

Started by :mod:`m3tfed.federation.zero` through torchrun, which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. Reads the work
folder the parent wrote (``spec.json``, ``data.pt``, the ``model`` checkpoint), builds
the institution's model under ``deepspeed.zero.Init`` (ZeRO-3: each rank only ever holds
its shard of every parameter, the frozen backbone included), trains the trainable
parameters for the job's steps, and rank 0 writes the gathered trainable components to
the ``result`` checkpoint. Everything a rank prints goes to ``rank<r>.log``; a rank that
fails also writes ``rank<r>.failed`` (its traceback) for the parent to report.

Data parallel: all ranks draw the same shuffled global batch of
``federation.batch_size`` samples and rank ``r`` trains on rows ``r, r + W, ...`` of it,
so a step sees as many samples as a step of the in-process path and gradients are
averaged over the ranks (a batch with fewer rows than ranks repeats rows).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import from_dict
from ..data import iterate_batches, model_inputs, num_samples, take
from ..model import M3TModel, ModelConfig
from ..moe import MoELayer
from ..plugin_manager import get_catalogue
from ..threads import env_threads
from ..training import make_optimizer
from .checkpoint import (
    TENSORS_FILE,
    flatten_components,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)

START = time.perf_counter()  # after torch and m3tfed are imported


class Clock:
    """Named laps, for the timings each rank reports."""

    def __init__(self):
        self.last, self.laps = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self.last = now - self.last, now


class LocalObjective(nn.Module):
    """The institution's training loss as a module, so ``deepspeed.initialize`` wraps its
    forward: one task's loss (plus FedProx's term when ``anchored``), and the tokens per
    expert. A step is one micro-step per task (:func:`.zero.deepspeed_config`)."""

    def __init__(self, model: M3TModel, anchors: list[tuple[nn.Parameter, torch.Tensor, float]]):
        super().__init__()
        self.model = model
        self.anchors = anchors  # (parameter, global value, mu) for FedProx

    def forward(
        self, inputs: dict[str, Any], targets: dict[str, torch.Tensor], task: str, anchored: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        loss, out = self.model.loss(inputs, task, targets[task])
        if anchored:
            for p, w0, mu in self.anchors:
                loss = loss + 0.5 * mu * (p - w0).pow(2).sum()
        return loss, out.tokens_per_expert


def main(argv: list[str]) -> int:
    folder = Path(argv[0])
    rank = int(os.environ["RANK"])
    # One log per rank (torchrun would interleave them); the parent shows its tail on failure.
    log = open(folder / f"rank{rank}.log", "ab", buffering=0)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    try:
        run(folder, rank, int(os.environ["WORLD_SIZE"]))
    except BaseException:
        text = traceback.format_exc()
        print(text, file=sys.stderr, flush=True)
        (folder / f"rank{rank}.failed").write_text(text)
        return 1
    return 0


def run(folder: Path, rank: int, world: int) -> None:
    clock = Clock()
    spec = json.loads((folder / "spec.json").read_text())
    catalogue = get_catalogue()
    for kind, name, package in spec["plugins"]:
        if name not in catalogue.specs.get(kind, {}):
            raise RuntimeError(
                f"{kind} plugin {name!r} (from {package}) is not installed for the DeepSpeed ranks: they find plugins through "
                f"entry points; installed {kind} plugins: {', '.join(catalogue.names(kind)) or 'none'}"
            )
    clock.lap("catalogue_s")
    import deepspeed  # only here: m3tfed imports DeepSpeed when a config asks for it
    import deepspeed.ops
    import torch.distributed as dist
    from deepspeed.utils import set_z3_leaf_modules

    clock.lap("import_deepspeed_s")
    torch.set_num_threads(env_threads())
    # DeepSpeed's CPU backend builds a shared-memory all-reduce op (a minute of C++
    # compiling on first use) that only its inference all-reduce calls: training never
    # does, so mark it unavailable (DeepSpeed keeps and honours this dict).
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=spec["backend"])
    clock.lap("init_distributed_s")
    ds_config = spec["ds_config"]
    stage = ds_config["zero_optimization"]["stage"]
    config = from_dict(ModelConfig, spec["model"], "model")
    torch.manual_seed(spec["seed"])
    # zero.Init patches tensor constructors, which breaks torch._dynamo if a plugin's
    # lazy import (transformers does) first loads it inside: load it outside.
    importlib.import_module("torch._dynamo")

    # ZeRO-3: parameters are partitioned as each module is built, so no rank ever holds
    # the whole backbone; they are filled from the parent's checkpoint module by module.
    with (
        skip_weight_init(),
        deepspeed.zero.Init(config_dict_or_path=ds_config) if stage == 3 else nullcontext(),
    ):
        # the institution's process checked these plugins' contracts when it built its model
        model = M3TModel(
            config, spec["modalities"], spec["tasks"], spec["experts"], catalogue=catalogue,
            check_contracts=False,  # checked by the institution's process before launch
        )
    model.wide_stats = {m: (torch.tensor(mean), torch.tensor(scale)) for m, (mean, scale) in spec["wide_stats"].items()}
    clock.lap("build_s")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if trainable != set(spec["trainable"]):
        raise RuntimeError(
            f"the ranks' model trains {sorted(trainable ^ set(spec['trainable']))} differently from the institution's model"
        )
    anchor_values = load_parameters(
        model, folder / "model", rank, stage, wanted=set(spec["anchored"])
    )
    clock.lap("load_s")
    named = dict(model.named_parameters())
    anchors = [(named[n], anchor_values[n], mu) for n, mu in spec["anchored"].items()]
    if stage == 3:
        # The router and experts run in an order that changes per batch (and the stacked
        # dispatch reads expert weights directly): gather a whole MoE layer at once.
        set_z3_leaf_modules(model, [MoELayer])
        # Parameters read outside their owner's forward must be fetched by the reader.
        for slot in model.tasks.values():
            deepspeed.zero.register_external_parameter(model, slot.embed)
    objective = LocalObjective(model, anchors)
    for p, _, _ in anchors:
        if stage == 3:
            deepspeed.zero.register_external_parameter(objective, p)
    params = [p for p in model.parameters() if p.requires_grad]
    s = spec["settings"]
    optimizer = make_optimizer(model, params, spec["lr"], s["optimizer"], s["weight_decay"])
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        optimizer=optimizer,
        model_parameters=params,
        config=ds_config,
        dist_init_required=False,
    )
    clock.lap("initialize_s")

    data = torch.load(folder / "data.pt", weights_only=True)
    gen = torch.Generator().manual_seed(spec["seed"])  # same stream on every rank
    batches = iterate_batches(data, s["batch_size"], gen)
    engine.train()
    losses = torch.zeros(spec["steps"])
    counts = torch.zeros(len(model.expert_names), dtype=torch.long)
    for step in range(spec["steps"]):
        batch = next(batches)
        n = num_samples(batch)
        mine = take(batch, torch.arange(rank, max(n, world), world) % n)
        mine = to_device(mine, engine.device)
        inputs, tasks = model_inputs(mine), spec["tasks"]
        for i, task in enumerate(tasks):  # micro-steps; the optimizer steps after the last
            loss, step_counts = engine(inputs, mine["targets"], task, anchored=i == len(tasks) - 1)
            # DeepSpeed divides a micro-step's loss by gradient_accumulation_steps (the
            # number of tasks): scaled back, the step's gradient is that of the summed loss.
            engine.backward(loss * len(tasks))
            engine.step()
            losses[step] += loss.detach()
            counts += step_counts
    clock.lap("train_s")
    step_s = clock.laps["train_s"] / max(spec["steps"], 1)
    dist.all_reduce(losses)
    losses /= world
    dist.all_reduce(counts)

    states = gather_trainable(model, rank)
    clock.lap("gather_s")
    report = {
        "rank": rank,
        "since_import_s": time.perf_counter() - START,
        "step_s": step_s,
        **clock.laps,
        **partition_sizes(model),
    }
    reports: list[Any] = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        meta = {
            "loss": float(losses.mean()) if spec["steps"] else 0.0,
            "losses": losses.tolist(),
            "tokens": {e: int(c) for e, c in zip(model.expert_names, counts.tolist()) if c},
            "ranks": reports,
            "zero_stage": stage,
            "world_size": world,
        }
        save_checkpoint(folder / "result", flatten_components(states), meta)
    dist.barrier()
    dist.destroy_process_group()


def to_device(tree: Any, device: torch.device) -> Any:
    """Tensors of a batch onto the ranks' device (lists such as raw texts stay)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: to_device(v, device) for k, v in tree.items()}
    return tree


def skip_weight_init():
    """Weight init is wasted work here (every value comes from the checkpoint) and
    transformers' ``post_init`` indexes parameters that ZeRO-3 has already partitioned
    into empty tensors: switch it off while building, where transformers is installed."""
    if importlib.util.find_spec("transformers") is None:
        return nullcontext()
    from transformers.initialization import no_init_weights

    return no_init_weights()


def load_parameters(
    model: nn.Module, path: Path, rank: int, stage: int, wanted: set[str]
) -> dict[str, torch.Tensor]:
    """Fill every parameter from the parent's checkpoint; return full copies of ``wanted``.

    ZeRO-3: module by module, each module's parameters are gathered, rank 0 copies the
    file's values in (read lazily from the memory-mapped file), and leaving
    ``GatheredParameters`` re-partitions them from rank 0's copy."""
    import deepspeed
    from safetensors import safe_open

    if stage != 3:
        tensors, _ = load_checkpoint(path)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(tensors[name])
        return {n: tensors[n].clone() for n in wanted}
    if rank == 0:
        verify_checkpoint(path)
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path / TENSORS_FILE), framework="pt") as f:
        keys = set(f.keys())
        for prefix, module in model.named_modules():
            own = [
                (f"{prefix}.{k}" if prefix else k, p)
                for k, p in module._parameters.items()
                if p is not None
            ]
            if not own:
                continue
            missing = [n for n, _ in own if n not in keys]
            if missing:
                raise RuntimeError(
                    f"{path}: the institution's model has no parameter {missing[0]!r}"
                )
            with (
                deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=0),
                torch.no_grad(),
            ):
                if rank == 0:
                    for name, p in own:
                        p.copy_(f.get_tensor(name))
            for name, _ in own:
                if name in wanted:
                    out[name] = f.get_tensor(name)
    return out


def gather_trainable(model: M3TModel, rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """Component -> full trainable tensors, on rank 0 (every rank takes part in gathering)."""
    import deepspeed

    states: dict[str, dict[str, torch.Tensor]] = {}
    for component, params in model._component_params().items():
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            if rank == 0:
                states[component] = {n: p.detach().clone() for n, p in params.items()}
    return states


def partition_sizes(model: nn.Module) -> dict[str, int]:
    """Elements of frozen and trainable parameters: in the model, and held by this rank."""
    sizes = {
        "frozen_numel": 0,
        "frozen_local_numel": 0,
        "trainable_numel": 0,
        "trainable_local_numel": 0,
    }
    for p in model.parameters():
        kind = "trainable" if p.requires_grad else "frozen"
        full = getattr(p, "ds_numel", p.numel())
        local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
        sizes[f"{kind}_numel"] += full
        sizes[f"{kind}_local_numel"] += local
    return sizes


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
