"""The plugin author's kit: one call per plugin kind that a plugin's own tests run.

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

A failure raises :class:`PluginCheckFailed`, both a ``ContractError`` (it names the
plugin and package) and an ``AssertionError`` (pytest shows it as a failed check).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import contracts
from .errors import ContractError
from .plugin_manager import get_catalogue
from .specs import REFERENCE_D_MODEL, Catalogue, EncoderSpec, ExpertSpec, RouterSpec, Spec, TaskSpec

__all__ = ["PluginCheckFailed", "check_encoder", "check_expert", "check_plugin", "check_router", "check_task", "resolve_spec"]


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


def _check_params(spec: Spec, num_experts: int | None) -> None:
    if getattr(spec, "params", None) is None:
        return
    with torch.random.fork_rng(devices=[]):
        module = contracts.build_module(spec, REFERENCE_D_MODEL, num_experts)
    contracts.check_param_count(spec, module)


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
        inputs = contracts.to_device(module.example_input(batch_size, gen), contracts._device(module))
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
        x = torch.randn(n_tokens, d_model, generator=gen).to(contracts._device(module), contracts._float_dtype(module))
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
        return torch.randn(n_tokens, d_model, generator=gen).to(contracts._device(module), contracts._float_dtype(module))

    def loss_fn(module, gen):
        routing = module(tokens(module, gen), masks[0].to(contracts._device(module)))
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
        device = contracts._device(module)
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


_CHECKS = {"encoder": check_encoder, "expert": check_expert, "router": check_router, "task": check_task}


def check_plugin(kind: str, name: str, catalogue: Catalogue | None = None) -> nn.Module:
    """Run the kit's check for an installed plugin of ``kind`` (used by ``m3tfed plugins --check``)."""
    if kind not in _CHECKS:
        raise ValueError(f"no contract check for {kind!r} plugins; checkable kinds: {', '.join(_CHECKS)}")
    spec = (catalogue or get_catalogue()).get(kind, name)
    return _CHECKS[kind](spec)
