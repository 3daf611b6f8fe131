"""The plugin author's kit: one check per plugin kind that a plugin's own tests run.

    from m3tfed.testing import check_expert
    from my_package import MY_EXPERT_SPEC

    def test_my_expert():
        check_expert(MY_EXPERT_SPEC)           # or check_expert("my_expert") once installed

Each ``check_*`` builds the module under ``torch.manual_seed(seed)`` and checks, in
order: the shape/dtype contract (:mod:`m3tfed.contracts`, the same checks the model
builder runs), the declared parameter count at ``REFERENCE_D_MODEL``, that a backward
pass reaches every trainable parameter with finite gradients, that two builds under the
same seed are identical, and that a state dict loaded into a fresh build reproduces the
outputs (what federation does every round). It returns the built module.

The other kinds have their own checks: :func:`check_aggregator` (shapes, no mutation,
refusal of a bad update, determinism, resume from ``state_dict``),
:func:`check_data_source` (the split format for every institution, determinism),
:func:`check_update_stage` (side, order, an institution-side ``process``) and
:func:`check_backend` (one round equal to the in-process simulation's).

A failure raises :class:`PluginCheckFailed`, both a ``ContractError`` (it names the
plugin and package) and an ``AssertionError`` (pytest shows it as a failed check).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import contracts
from .contracts import count_params
from .errors import ConfigError, ContractError
from .interfaces import Aggregator, Backend, RoundContext, as_update_stage
from .messages import ComponentUpdate
from .plugin_manager import get_catalogue
from .specs import (
    REFERENCE_D_MODEL,
    AggregatorSpec,
    BackendSpec,
    Catalogue,
    DataSourceSpec,
    EncoderSpec,
    ExpertSpec,
    RouterSpec,
    Spec,
    TaskSpec,
    UpdateStageSpec,
)

__all__ = [
    "PluginCheckFailed",
    "check_aggregator",
    "check_backend",
    "check_data_source",
    "check_encoder",
    "check_expert",
    "check_plugin",
    "check_router",
    "check_task",
    "check_update_stage",
    "resolve_spec",
    "training_memory_mb",
]


class PluginCheckFailed(ContractError, AssertionError):
    """A plugin failed one of the author's-kit checks."""


def resolve_spec(kind: str, spec: Spec | str) -> Spec:
    """A spec object as is, or the installed plugin of that kind with that name."""
    if isinstance(spec, str):
        return get_catalogue().get(kind, spec)
    if spec.kind != kind:
        raise TypeError(f"expected a {kind} spec, got a {spec.kind} spec ({spec.name!r})")
    return spec


# -- shared steps --------------------------------------------------------------------------


def _fail(spec: Spec, problem: str) -> PluginCheckFailed:
    return PluginCheckFailed(spec.kind, spec.name, spec.package, problem)


def _build(spec: Spec, seed: int, d_model: int, num_experts: int | None, options: dict[str, Any]) -> nn.Module:
    torch.manual_seed(seed)
    return contracts.build_module(spec, d_model, num_experts, **options)


def training_memory_mb(module: nn.Module) -> int:
    """MiB to train ``module`` in fp32 with AdamW: weights, gradients and two moments
    for trainable parameters (16 bytes each), weights alone for frozen ones (4 bytes)."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return math.ceil((16 * trainable + 4 * frozen) / 2**20)


def _check_params(spec: Spec, num_experts: int | None) -> None:
    if getattr(spec, "params", None) is None:
        return
    with torch.random.fork_rng(devices=[]):
        module = contracts.build_module(spec, REFERENCE_D_MODEL, num_experts)
    contracts.check_param_count(spec, module)
    need = training_memory_mb(module)
    if spec.min_memory_mb < need:
        raise _fail(
            spec,
            f"declares min_memory_mb={spec.min_memory_mb:g} but training its {count_params(module):,} parameters "
            f"(d_model={REFERENCE_D_MODEL}, fp32 + AdamW) takes {need} MiB; the memory filter would give it to "
            "institutions that cannot train it",
        )


def _check_gradients(spec: Spec, module: nn.Module, loss_fn: Callable[[nn.Module, torch.Generator], torch.Tensor]) -> None:
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        return
    module.zero_grad(set_to_none=True)
    with contracts.checking(module, train=True):
        gen = torch.Generator().manual_seed(contracts.SEED)
        loss = contracts._call(spec, "forward in train mode", loss_fn, module, gen)
        contracts._call(spec, "backward", loss.backward)
    missing = [n for n, p in trainable if p.grad is None]
    if missing:
        raise _fail(
            spec,
            f"no gradient reached trainable parameter(s) {missing}; set requires_grad=False on parts "
            "that are frozen by design, or make example inputs exercise them",
        )
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    if bad:
        raise _fail(spec, f"NaN or inf gradient in {bad}")
    if all(float(p.grad.abs().sum()) == 0.0 for _, p in trainable):
        raise _fail(spec, "every gradient is zero: the output does not depend on the parameters")
    module.zero_grad(set_to_none=True)


def _outputs(spec: Spec, module: nn.Module, run: Callable[[nn.Module, torch.Generator], list[torch.Tensor]]) -> list[torch.Tensor]:
    with contracts.checking(module), torch.no_grad():
        return contracts._call(spec, "forward in eval mode", run, module, torch.Generator().manual_seed(contracts.SEED))


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and (torch.equal(x, y) if not x.is_floating_point() else torch.allclose(x, y, rtol=1e-5, atol=1e-6))
        for x, y in zip(a, b)
    )


def _check_reproducible(
    spec: Spec,
    first: nn.Module,
    seed: int,
    d_model: int,
    num_experts: int | None,
    options: dict[str, Any],
    run: Callable[[nn.Module, torch.Generator], list[torch.Tensor]],
) -> None:
    reference = _outputs(spec, first, run)
    second = _build(spec, seed, d_model, num_experts, options)
    s1, s2 = first.state_dict(), second.state_dict()
    if list(s1) != list(s2):
        raise _fail(spec, f"two builds under torch.manual_seed({seed}) have different state-dict keys")
    differ = [k for k in s1 if not torch.equal(s1[k], s2[k])]
    if differ:
        raise _fail(spec, f"two builds under torch.manual_seed({seed}) differ in {differ[:5]}: draw all randomness from torch's RNG")
    if not _same(reference, _outputs(spec, second, run)):
        raise _fail(spec, f"two builds under torch.manual_seed({seed}) give different outputs on the same input")

    fresh = _build(spec, seed + 1, d_model, num_experts, options)
    try:
        fresh.load_state_dict(first.state_dict())
    except Exception as exc:
        raise _fail(spec, f"load_state_dict into a fresh build failed: {exc}") from exc
    if not _same(reference, _outputs(spec, fresh, run)):
        raise _fail(
            spec,
            "a fresh build loaded with the state dict gives different outputs: some state lives outside "
            "parameters and buffers (register it as a buffer)",
        )


def _run_kit(
    spec: Spec,
    d_model: int,
    num_experts: int | None,
    seed: int,
    check_params: bool,
    options: dict[str, Any],
    contract: Callable[[nn.Module], Any],
    loss_fn: Callable[[nn.Module, torch.Generator], torch.Tensor],
    run: Callable[[nn.Module, torch.Generator], list[torch.Tensor]],
) -> nn.Module:
    try:
        with torch.random.fork_rng(devices=[]):
            module = _build(spec, seed, d_model, num_experts, options)
            contract(module)
            if check_params:
                _check_params(spec, num_experts)
            _check_gradients(spec, module, loss_fn)
            _check_reproducible(spec, module, seed, d_model, num_experts, options, run)
    except PluginCheckFailed:
        raise
    except ContractError as exc:  # the contract checks' error, as a failed check
        raise PluginCheckFailed(exc.kind, exc.plugin, exc.package, exc.problem) from exc
    return module


def _weighted(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A scalar whose gradient reaches every element (a plain mean would vanish after a
    LayerNorm, whose outputs always average to the bias)."""
    return (x * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)).sum()


# -- one check per kind ------------------------------------------------------------------


def check_encoder(
    spec: EncoderSpec | str, d_model: int = 32, batch_size: int = 2, seed: int = 0, check_params: bool = True, **options: Any
) -> nn.Module:
    """Build with ``options``, forward ``example_input(batch_size)``, backward, seed
    determinism and state-dict round trip; returns the module."""
    spec = resolve_spec("encoder", spec)

    def forward(module: nn.Module, gen: torch.Generator):
        inputs = contracts.to_device(module.example_input(batch_size, gen), contracts.module_device(module))
        return module(inputs)

    def loss_fn(module, gen):
        tokens, mask = forward(module, gen)
        return _weighted(tokens * mask.unsqueeze(-1).to(tokens.dtype), gen)

    return _run_kit(
        spec, d_model, None, seed, check_params, options,
        lambda m: contracts.check_encoder_module(spec, m, d_model, batch_size),
        loss_fn, lambda m, g: list(forward(m, g)),
    )


def check_expert(
    spec: ExpertSpec | str, d_model: int = 32, n_tokens: int = 6, seed: int = 0, check_params: bool = True, **options: Any
) -> nn.Module:
    """Build with ``options``, ``[n_tokens, d_model] -> [n_tokens, d_model]`` token-wise,
    backward, seed determinism and state-dict round trip; returns the module."""
    spec = resolve_spec("expert", spec)

    def forward(module, gen):
        x = torch.randn(n_tokens, d_model, generator=gen).to(contracts.module_device(module), contracts._float_dtype(module))
        return module(x)

    return _run_kit(
        spec, d_model, None, seed, check_params, options,
        lambda m: contracts.check_expert_module(spec, m, d_model, n_tokens),
        lambda m, g: _weighted(forward(m, g), g), lambda m, g: [forward(m, g)],
    )


def check_router(
    spec: RouterSpec | str, num_experts: int = 4, d_model: int = 32, n_tokens: int = 8, seed: int = 0, **options: Any
) -> nn.Module:
    """Build with ``options``; route with all experts, the last masked, and only expert
    0 allowed (an institution may pick a single expert, fewer than top-k); backward
    through weights and aux losses; seed determinism and state-dict round trip."""
    spec = resolve_spec("router", spec)
    masks = [torch.ones(num_experts, dtype=torch.bool)]
    if num_experts > 1:
        masks += [torch.arange(num_experts) < num_experts - 1, torch.arange(num_experts) == 0]

    def tokens(module, gen):
        return torch.randn(n_tokens, d_model, generator=gen).to(contracts.module_device(module), contracts._float_dtype(module))

    def loss_fn(module, gen):
        routing = module(tokens(module, gen), masks[0].to(contracts.module_device(module)))
        loss = _weighted(routing.weight, gen)
        for value in (getattr(routing, "aux_losses", None) or {}).values():
            loss = loss + value
        return loss

    def run(module, gen):
        x = tokens(module, gen)
        out = []
        for mask in masks:
            r = module(x, mask.to(x.device))
            out += [r.token_index, r.expert_index, r.weight]
        return out

    return _run_kit(
        spec, d_model, num_experts, seed, True, options,
        lambda m: contracts.check_router_module(spec, m, d_model, num_experts, n_tokens, expert_masks=masks),
        loss_fn, run,
    )


def check_task(
    spec: TaskSpec | str, d_model: int = 32, batch_size: int = 4, seq_len: int = 5, seed: int = 0, **options: Any
) -> nn.Module:
    """Build with ``options``; prediction, ``example_target``, loss and metrics agree;
    the loss backpropagates into the head; seed determinism and state-dict round trip."""
    spec = resolve_spec("task", spec)

    def inputs(module, gen):
        device = contracts.module_device(module)
        tokens = torch.randn(batch_size, seq_len, d_model, generator=gen).to(device, contracts._float_dtype(module))
        mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        mask[0, 1:] = False  # one sample with a single real token
        return tokens, mask

    def loss_fn(module, gen):
        pred = module(*inputs(module, gen))
        return module.loss(pred, module.example_target(batch_size, gen).to(pred.device))

    return _run_kit(
        spec, d_model, None, seed, True, options,
        lambda m: contracts.check_task_module(spec, m, d_model, batch_size, seq_len),
        loss_fn, lambda m, g: [m(*inputs(m, g))],
    )


# -- the kinds that are not model parts --------------------------------------------------


def _plain(spec: Spec, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call plugin code; its exception becomes a failed check naming the plugin. A
    ``ConfigError`` (the plugin needs options or infrastructure it was not given) is
    passed through, so ``m3tfed plugins --check`` can say "skipped" and why."""
    try:
        return fn(*args, **kwargs)
    except (PluginCheckFailed, ConfigError):
        raise
    except Exception as exc:
        raise _fail(spec, f"{what} raised {type(exc).__name__}: {exc}") from exc


def _example_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "weight": torch.randn(3, 4, generator=gen),
        "bias": torch.randn(4, generator=gen),
        "steps": torch.tensor(5),  # a non-float tensor: kept as the server has it
    }


def _example_updates(state: dict[str, torch.Tensor], gen: torch.Generator, n: int = 4) -> list[ComponentUpdate]:
    keys = [k for k, t in state.items() if t.is_floating_point()]
    return [
        ComponentUpdate(f"inst{i}", "expert.check", {k: 0.1 * torch.randn(state[k].shape, generator=gen) for k in keys}, float(i + 1))
        for i in range(n)
    ]


def check_aggregator(spec: AggregatorSpec | str, seed: int = 0, rounds: int = 2, n_updates: int = 10, **options: Any) -> Aggregator:
    """Build with ``options`` and aggregate ``rounds`` rounds of ``n_updates`` updates (10:
    enough for robust rules that trim a share of them) into a small
    component: the new state has the current keys, shapes and dtypes, is finite, keeps
    non-float tensors, leaves ``current`` and the updates untouched; an update with a
    wrong shape is refused with ``ValueError``; two builds give the same states; and an
    aggregator restored from ``state_dict()`` continues exactly like the original (what a
    resumed run does). Returns the aggregator."""
    spec = resolve_spec("aggregator", spec)
    gen = torch.Generator().manual_seed(seed)
    start = _example_state(gen)
    rounds_of_updates = [_example_updates(start, gen, n_updates) for _ in range(rounds + 1)]

    def run(agg: Any, state: dict[str, torch.Tensor], batches: list[list[ComponentUpdate]]) -> list[dict[str, torch.Tensor]]:
        states = []
        for updates in batches:
            before = {k: v.clone() for k, v in state.items()}
            sent = [{k: v.clone() for k, v in u.delta.items()} for u in updates]
            new = _plain(spec, "aggregate", agg.aggregate, "expert.check", state, updates)
            if not all(torch.equal(state[k], before[k]) for k in state) or not all(
                torch.equal(u.delta[k], s[k]) for u, s in zip(updates, sent) for k in s
            ):
                raise _fail(spec, "aggregate mutated the current state or an update; return fresh tensors")
            if not isinstance(new, dict) or set(new) != set(state):
                raise _fail(spec, f"aggregate must return every key of the current state {sorted(state)}, got {sorted(new) if isinstance(new, dict) else type(new).__name__}")
            for k, t in state.items():
                if not isinstance(new[k], torch.Tensor) or new[k].shape != t.shape or new[k].dtype != t.dtype:
                    raise _fail(spec, f"key {k!r}: expected {t.dtype} {list(t.shape)}, got {_shape_dtype(new[k])}")
                if t.is_floating_point() and not torch.isfinite(new[k]).all():
                    raise _fail(spec, f"key {k!r} holds NaN or inf after aggregating finite updates")
            if not torch.equal(new["steps"], state["steps"]):
                raise _fail(spec, "a non-float tensor changed; keep integer and bool tensors as the server has them")
            states.append(new)
            state = new
        return states

    agg = _plain(spec, f"build({options})", spec.build, **options)
    if not isinstance(agg, Aggregator):
        missing = [m for m in ("aggregate", "state_dict", "load_state_dict") if not callable(getattr(agg, m, None))]
        if missing or not isinstance(getattr(agg, "proximal_mu", None), int | float):
            raise _fail(spec, f"build() must return an m3tfed.Aggregator (or an object with aggregate, state_dict, load_state_dict and proximal_mu); {type(agg).__name__} lacks {missing or ['proximal_mu']}")
    reference = run(agg, start, rounds_of_updates[:rounds])
    bad = [ComponentUpdate("inst0", "expert.check", {"weight": torch.zeros(2, 2), "bias": torch.zeros(4)}, 1.0)]
    try:
        agg.aggregate("expert.check", reference[-1], bad)
    except ValueError:
        pass
    except Exception as exc:
        raise _fail(spec, f"an update with a wrong shape must raise ValueError, got {type(exc).__name__}: {exc}") from exc
    else:
        raise _fail(spec, "an update whose 'weight' is [2, 2] instead of [3, 4] was accepted")
    again = run(_plain(spec, "build", spec.build, **options), start, rounds_of_updates[:rounds])
    if not _same([t for s in reference for t in s.values()], [t for s in again for t in s.values()]):
        raise _fail(spec, "two builds aggregate the same updates differently: keep no hidden randomness")
    # resume: a fresh build loaded with the state after round 1 must do round 2 as the original did
    first = _plain(spec, "build", spec.build, **options)
    after_one = run(first, start, rounds_of_updates[:1])[-1]
    saved = _plain(spec, "state_dict", first.state_dict)
    resumed = _plain(spec, "build", spec.build, **options)
    _plain(spec, "load_state_dict", resumed.load_state_dict, {k: v.clone() for k, v in saved.items()})
    want = run(first, after_one, rounds_of_updates[1:2])
    got = run(resumed, after_one, rounds_of_updates[1:2])
    if not _same(list(want[0].values()), list(got[0].values())):
        raise _fail(spec, "an aggregator restored from state_dict() aggregates differently from the original: save all server state there")
    return agg


def _shape_dtype(x: Any) -> str:
    return f"{x.dtype} {list(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _leading(tree: Any, path: str) -> list[tuple[str, int]]:
    """(path, leading size) of every leaf of a split's tensor tree."""
    if isinstance(tree, torch.Tensor):
        return [(path, int(tree.shape[0]) if tree.dim() else -1)]
    if isinstance(tree, dict):
        return [x for k, v in tree.items() for x in _leading(v, f"{path}.{k}" if path else str(k))]
    if isinstance(tree, list):
        return [(path, len(tree))]
    return [(path, -2)]


def _check_split(spec: Spec, where: str, split: Any, modalities: list[str], tasks: list[str]) -> int:
    if not isinstance(split, dict) or not isinstance(split.get("targets"), dict):
        raise _fail(spec, f"{where} must be a dict with a 'targets' dict (task -> [N, ...] tensor)")
    missing = [t for t in tasks if t not in split["targets"]]
    if missing:
        raise _fail(spec, f"{where} has no targets for task(s) {missing}")
    extra = [k for k in split if k not in ("targets", "present") and k not in modalities]
    if extra:
        raise _fail(spec, f"{where} has input(s) {extra} that are not among the institution's modalities {modalities}")
    sizes = _leading(split, "")
    n = sizes[0][1]
    odd = [(p, s) for p, s in sizes if s != n]
    if n < 1 or odd:
        raise _fail(spec, f"{where}: every input, presence mask and target must have the same number of samples N >= 1; got {sizes[:6]}")
    for mod, mask in (split.get("present") or {}).items():
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 1:
            raise _fail(spec, f"{where}: present[{mod!r}] must be a [N] bool tensor, got {_shape_dtype(mask)}")
    for task, target in split["targets"].items():
        if not isinstance(target, torch.Tensor):
            raise _fail(spec, f"{where}: target {task!r} must be a tensor, got {type(target).__name__}")
        if target.is_floating_point() and not torch.isfinite(target).all():
            raise _fail(spec, f"{where}: target {task!r} holds NaN or inf")
    return n


def _equal_trees(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        if not (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype):
            return False
        return torch.equal(a, b) if not a.is_floating_point() else bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_equal_trees(a[k], b[k]) for k in a)
    return a == b


def check_data_source(
    spec: DataSourceSpec | str,
    institutions: list[Any] | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Build with ``options`` and ``load`` the ``institutions`` (objects or dicts with
    ``name``, ``modalities``, ``tasks``; default: the source's ``example_institutions()``):
    every institution gets ``InstitutionData`` whose train, val and test splits hold targets
    for each of its tasks, inputs only for its modalities, one sample count N >= 1
    across every input, presence mask and target, [N] bool presence masks and finite
    float targets; the same seed loads the same data. Returns the loaded data."""
    from types import SimpleNamespace

    spec = resolve_spec("data", spec)
    source = _plain(spec, f"build({options})", spec.build, **options)
    if not callable(getattr(source, "load", None)):
        raise _fail(spec, f"build() must return an object with load(institutions, seed, data_root); {type(source).__name__} has none")
    if institutions is None:
        example = getattr(source, "example_institutions", None)
        if not callable(example):
            raise _fail(spec, "give institutions=[...] (name, modalities, tasks) or let the source offer example_institutions()")
        institutions = _plain(spec, "example_institutions()", example)
    insts = [SimpleNamespace(**i) if isinstance(i, dict) else i for i in institutions]
    root = Path(data_root) if data_root is not None else None
    data = _plain(spec, "load", source.load, insts, seed, root)
    if not isinstance(data, dict) or set(data) != {i.name for i in insts}:
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise _fail(spec, f"load must return {{institution name: InstitutionData}} for exactly {sorted(i.name for i in insts)}, got {got}")
    for inst in insts:
        d = data[inst.name]
        for split in ("train", "val", "test"):  # choices are made on val, so it is never optional
            _check_split(spec, f"institution {inst.name!r} {split} split", getattr(d, split, None), list(inst.modalities), list(inst.tasks))
        if not isinstance(getattr(d, "report", None), dict):
            raise _fail(spec, f"institution {inst.name!r}: report must be a dict (what the source dropped or fixed)")
    again = _plain(spec, "load (again, same seed)", _plain(spec, "build", spec.build, **options).load, insts, seed, root)
    for inst in insts:
        a, b = data[inst.name], again[inst.name]
        if not all(_equal_trees(getattr(a, s), getattr(b, s)) for s in ("train", "val", "test")):
            raise _fail(spec, f"institution {inst.name!r}: two loads with seed {seed} differ; draw randomness from generators seeded by the seed")
    return data


def check_update_stage(spec: UpdateStageSpec | str, seed: int = 0, **options: Any) -> Any:
    """Build with ``options`` and adapt as the builder does (:func:`m3tfed.interfaces.as_update_stage`):
    ``side`` is one of ``SIDES``, ``process`` is callable, ``order`` and ``server_order`` are ints;
    an institution-side stage also processes four updates with a plain
    ``RoundContext`` (round 1, no privacy state): it returns ComponentUpdates for
    components it was given, with the keys and shapes sent, and leaves its input
    untouched. Server-side steps need a running federation; the conformance suite's
    federation tests run them. Returns the stage."""
    spec = resolve_spec("stage", spec)
    built = _plain(spec, f"build({options})", spec.build, **options)
    try:  # as the federation builder takes it: side, order and server_order checked
        stage = as_update_stage(built, spec.order)
    except TypeError as exc:
        raise _fail(spec, str(exc)) from None
    if stage.side != "institution":
        return stage
    gen = torch.Generator().manual_seed(seed)
    state = _example_state(gen)
    updates = _example_updates(state, gen)
    sent = [{k: v.clone() for k, v in u.delta.items()} for u in updates]
    out = _plain(spec, "process", stage.process, updates, RoundContext(1, institution="inst0"))
    if not isinstance(out, list) or not all(isinstance(u, ComponentUpdate) for u in out):
        raise _fail(spec, f"process must return a list of ComponentUpdate, got {type(out).__name__}")
    if not all(torch.equal(u.delta[k], s[k]) for u, s in zip(updates, sent) for k in s):
        raise _fail(spec, "process changed the updates it was given; return new ones")
    for u in out:
        if u.component != "expert.check" or set(u.delta) != set(sent[0]):
            raise _fail(spec, f"process returned an update for {u.component!r} with keys {sorted(u.delta)}; expected the components and keys it was given")
        for k, t in u.delta.items():
            if t.shape != state[k].shape:
                raise _fail(spec, f"process changed the shape of {k!r} to {list(t.shape)}")
    return stage


def check_backend(spec: BackendSpec | str, **options: Any) -> Any:
    """Run one round of a tiny synthetic federation on this backend and on the
    in-process simulation: the backend answers ``components_of``, ``personal_of``,
    ``local_steps`` and the ``capabilities`` message for every institution, every
    institution succeeds, and the new global state equals the simulation's (jobs carry
    their seeds, so where a job runs must not change its result). A backend that needs
    infrastructure raises ``ConfigError`` from ``build``; that is passed through
    unchanged. Returns the backend."""
    from .defaults import default_config_dict
    from .federation.build import build_federation
    from .federation.config import load_config

    spec = resolve_spec("backend", spec)
    d = default_config_dict()
    d["rounds"] = 1
    d["federation"].update({"local_steps": 1, "batch_size": 8, "min_institutions": 1})
    for profile in d["data"]["options"]["profiles"].values():
        profile["n"] = 16
    d["evaluation"] = {"baselines": [], "personalize": False, "plots": False}
    catalogue = _with_spec(get_catalogue(), spec)

    def one_round(backend_name: str, backend_options: dict[str, Any]):
        cfg = dict(d, federation={**d["federation"], "backend": {"plugin": backend_name, "options": backend_options}})
        fed = build_federation(load_config(cfg), catalogue=catalogue)
        report = fed.server.run_round(1)
        return fed, report

    try:
        fed, report = one_round(spec.name, options)
    except ConfigError:
        raise
    except Exception as exc:
        raise _fail(spec, f"one round raised {type(exc).__name__}: {exc}") from exc
    backend = fed.server.backend
    if not isinstance(backend, Backend):
        missing = [m for m in ("components_of", "personal_of", "local_steps", "ask", "train", "save_personal", "load_personal") if not callable(getattr(backend, m, None))]
        raise _fail(spec, f"the backend lacks {missing} (see m3tfed.Backend)")
    for name, inst in fed.institutions.items():
        if sorted(backend.components_of(name)) != sorted(inst.component_names()):
            raise _fail(spec, f"components_of({name!r}) is not the institution's components")
        if list(backend.personal_of(name)) != list(inst.config.personal) or backend.local_steps(name) != inst.local_steps():
            raise _fail(spec, f"personal_of/local_steps for {name!r} differ from the institution's")
        caps = _plain(spec, f"ask({name!r}, 'capabilities')", backend.ask, name, "capabilities", {})
        if caps.get("name") != name:
            raise _fail(spec, f"ask({name!r}, 'capabilities') answered for {caps.get('name')!r}")
    if report.dropped:
        raise _fail(spec, f"institutions were dropped in a round the simulation completes: {report.dropped}")
    reference, _ = one_round("simulation", {})
    for comp, state in reference.server.state.items():
        if not _same(list(state.values()), list(fed.server.state[comp].values())):
            raise _fail(spec, f"component {comp!r} after one round differs from the in-process simulation's")
    return backend


def _with_spec(catalogue: Catalogue, spec: Spec) -> Catalogue:
    """The catalogue with ``spec`` in it (a spec object that is not installed)."""
    if catalogue.specs[spec.kind].get(spec.name) is spec:
        return catalogue
    specs = {kind: dict(named) for kind, named in catalogue.specs.items()}
    specs[spec.kind][spec.name] = spec
    return replace(catalogue, specs=specs)


_CHECKS = {
    "encoder": check_encoder,
    "expert": check_expert,
    "router": check_router,
    "task": check_task,
    "aggregator": check_aggregator,
    "data": check_data_source,
    "stage": check_update_stage,
    "backend": check_backend,
}


def check_plugin(kind: str, name: str, catalogue: Catalogue | None = None, data_root: str | Path | None = None) -> Any:
    """Run the kit's check for an installed plugin of ``kind`` (used by ``m3tfed plugins
    --check``; ``data_root`` is where data sources read files)."""
    if kind not in _CHECKS:
        raise ValueError(f"no check for {kind!r} plugins; kinds: {', '.join(_CHECKS)}")
    spec = (catalogue or get_catalogue()).get(kind, name)
    if kind == "data":
        return check_data_source(spec, data_root=data_root)
    return _CHECKS[kind](spec)
