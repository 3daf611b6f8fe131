"""Contract checks: does the module a plugin builds do what its kind promises?

Used in two places: the model builder runs :func:`build_module` and
:func:`check_module` on every plugin part it assembles (so a bad third-party plugin
fails at build time with its name, not deep in a training step), and the author's kit (:mod:`m3tfed.testing`) runs the same checks
plus gradient, determinism and state-dict tests.

Every failure raises :class:`~m3tfed.errors.ContractError` naming the plugin, its
package and what was expected against what came back. The checks use their own random
generator and restore the global RNG and the module's train/eval mode, so running them
does not change what a seeded model builder produces.

Not here: metadata checks (the plugin manager rejects specs without a name, version,
licence, ...) and training quality.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import ContractError
from .specs import REFERENCE_D_MODEL, EncoderSpec, ExpertSpec, RouterSpec, Spec, TaskSpec

__all__ = [
    "build_checked",
    "build_module",
    "check_encoder_module",
    "check_expert_module",
    "check_module",
    "check_param_count",
    "check_router_module",
    "check_routing",
    "check_task_module",
    "check_tokens",
    "count_params",
]

SEED = 1234  # the checks' own generator; fixed so a failure reproduces


# -- helpers -----------------------------------------------------------------------------


def _fail(spec: Spec, problem: str) -> ContractError:
    return ContractError(spec.kind, spec.name, spec.package, problem)


def _shape(x: Any) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _float_dtype(module: nn.Module) -> torch.dtype:
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, list | tuple) and any(isinstance(v, torch.Tensor) for v in obj):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@contextlib.contextmanager
def checking(module: nn.Module, train: bool = False) -> Iterator[None]:
    """Run with the module in eval (or train) mode and the global RNG untouched."""
    was_training = module.training
    module.train(train)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        module.train(was_training)


def _call(spec: Spec, what: str, fn, *args, **kwargs):
    """Call plugin code; turn its exception into a ContractError that names it."""
    try:
        return fn(*args, **kwargs)
    except ContractError:
        raise
    except Exception as exc:
        raise _fail(spec, f"{what} raised {type(exc).__name__}: {exc}") from exc


def count_params(module: nn.Module) -> int:
    """Trainable + frozen parameters (shared tensors once)."""
    return sum(p.numel() for p in module.parameters())


# -- per kind ----------------------------------------------------------------------------


def check_param_count(spec: Spec, module: nn.Module) -> None:
    """``spec.params`` (declared at ``REFERENCE_D_MODEL`` with default options) against
    ``module``, which must be built that way. ``params=None`` means undeclared: skip."""
    declared = getattr(spec, "params", None)
    if declared is None:
        return
    real = count_params(module)
    if real != declared:
        raise _fail(
            spec,
            f"declares params={declared:,} but build(d_model={REFERENCE_D_MODEL}) with default options "
            f"has {real:,} parameters (off by {real - declared:+,}); fix params in its "
            f"{type(spec).__name__} (and registry.toml)",
        )


def check_tokens(
    out: Any, d_model: int, kind: str = "encoder", plugin: str = "?", package: str = "", batch_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """An encoder's output: ``Tokens(tokens [B, T, d_model] floating, mask [B, T] bool)``.

    Shapes and dtypes only (no device sync), so the model can run it on every forward.
    Returns ``(tokens, mask)``."""

    def fail(problem: str) -> ContractError:
        return ContractError(kind, plugin, package, problem)

    b_txt = "B" if batch_size is None else str(batch_size)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise fail(f"forward must return Tokens(tokens, mask), got {type(out).__name__}")
    tokens, mask = out
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3:
        raise fail(f"tokens must be [B, T, d_model] = [{b_txt}, T, {d_model}], got {_shape(tokens)}")
    b, t, d = tokens.shape
    if d != d_model or (batch_size is not None and b != batch_size):
        raise fail(f"tokens must be [B, T, d_model] = [{b_txt}, T, {d_model}], got {list(tokens.shape)}")
    if not tokens.is_floating_point():
        raise fail(f"tokens must be a floating dtype, got {tokens.dtype}")
    if not isinstance(mask, torch.Tensor) or list(mask.shape) != [b, t]:
        raise fail(f"mask must be [B, T] = [{b}, {t}] like the tokens, got {_shape(mask)}")
    if mask.dtype != torch.bool:
        raise fail(f"mask must be torch.bool (True = real token), got {mask.dtype}")
    return tokens, mask


def check_encoder_module(
    spec: EncoderSpec, module: nn.Module, d_model: int, batch_size: int = 2, inputs: Any = None
):
    """Forward ``module.example_input(batch_size)`` (or ``inputs``): tokens must be
    ``[B, T, d_model]`` floating and finite with ``T >= 1``, mask ``[B, T]`` bool.
    Returns the Tokens."""
    if not callable(getattr(module, "example_input", None)) and inputs is None:
        raise _fail(spec, "module has no example_input(batch_size, generator) method")
    with checking(module), torch.no_grad():
        if inputs is None:
            gen = torch.Generator().manual_seed(SEED)
            inputs = _call(spec, f"example_input({batch_size})", module.example_input, batch_size, gen)
        out = _call(spec, "forward(example_input)", module, to_device(inputs, module_device(module)))
    tokens, _ = check_tokens(out, d_model, spec.kind, spec.name, spec.package, batch_size)
    if tokens.shape[1] < 1:
        raise _fail(spec, f"tokens has T = 0 for a batch of {batch_size}; return at least one (masked) token")
    if not torch.isfinite(tokens).all():
        raise _fail(spec, "tokens contain NaN or inf (padding positions too: attention would spread them)")
    if callable(getattr(module, "wide_features", None)):  # m3tfed.WideFeatures
        with checking(module), torch.no_grad():
            feats = _call(spec, "wide_features(example_input)", module.wide_features, to_device(inputs, module_device(module)))
        width = getattr(module, "wide_width", None)
        if not isinstance(feats, torch.Tensor) or not feats.is_floating_point() or list(feats.shape) != [batch_size, width]:
            raise _fail(spec, f"wide_features must return a float [B, wide_width] = [{batch_size}, {width}] tensor, got {_shape(feats)}")
        if not torch.isfinite(feats).all():
            raise _fail(spec, "wide_features contain NaN or inf (a missing value is an indicator, not a NaN)")
    return out


def check_expert_module(spec: ExpertSpec, module: nn.Module, d_model: int, n_tokens: int = 6) -> torch.Tensor:
    """``[N, d_model] -> [N, d_model]`` in the module's dtype, finite, and token-wise: the
    MoE layer hands an expert any subset of tokens, so a token's output must not depend
    on which other tokens came with it. Returns the output."""
    dtype = _float_dtype(module)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(n_tokens, d_model, generator=gen).to(module_device(module), dtype)
    with checking(module), torch.no_grad():
        out = _call(spec, f"forward([{n_tokens}, {d_model}])", module, x)
        if not isinstance(out, torch.Tensor) or list(out.shape) != [n_tokens, d_model]:
            raise _fail(spec, f"output must be [N, d_model] = [{n_tokens}, {d_model}] for input [{n_tokens}, {d_model}], got {_shape(out)}")
        if out.dtype != dtype:
            raise _fail(spec, f"output dtype must match the input's {dtype}, got {out.dtype}")
        if not torch.isfinite(out).all():
            raise _fail(spec, "output contains NaN or inf on a standard normal input")
        k = max(1, n_tokens // 2)
        part = _call(spec, f"forward([{k}, {d_model}])", module, x[:k])
        if not isinstance(part, torch.Tensor) or not torch.allclose(part, out[:k], rtol=1e-4, atol=1e-5):
            raise _fail(
                spec,
                f"output for the first {k} tokens changes when they come with {n_tokens - k} others; "
                "an expert must treat tokens independently (no batch statistics or mixing across N)",
            )
    return out


def _expert_masks(num_experts: int, device: torch.device) -> list[torch.Tensor]:
    all_on = torch.ones(num_experts, dtype=torch.bool, device=device)
    if num_experts < 2:
        return [all_on]
    last_off = all_on.clone()
    last_off[-1] = False
    return [all_on, last_off]


def check_routing(spec: RouterSpec, routing: Any, n_tokens: int, num_experts: int, expert_mask: torch.Tensor | None) -> None:
    """One Routing result: fields, dtypes, ranges, the expert mask, gate weights that are
    finite, non-negative and sum to at most 1 per token, and scalar aux losses."""
    where = "all experts allowed" if expert_mask is None or bool(expert_mask.all()) else (
        f"expert_mask={expert_mask.int().tolist()}"
    )
    fields = ("token_index", "expert_index", "weight")
    if not all(hasattr(routing, f) for f in fields):
        raise _fail(spec, f"forward must return Routing(token_index, expert_index, weight, aux_losses, stats), got {type(routing).__name__}")
    tok, exp, w = routing.token_index, routing.expert_index, routing.weight
    for name, t in zip(fields, (tok, exp, w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise _fail(spec, f"Routing.{name} must be a 1-D tensor [M], got {_shape(t)} ({where})")
    if not (len(tok) == len(exp) == len(w)):
        raise _fail(spec, f"Routing fields differ in length: token_index {len(tok)}, expert_index {len(exp)}, weight {len(w)} ({where})")
    if tok.dtype != torch.long or exp.dtype != torch.long:
        raise _fail(spec, f"token_index and expert_index must be torch.long, got {tok.dtype} and {exp.dtype}")
    if not w.is_floating_point():
        raise _fail(spec, f"Routing.weight must be floating, got {w.dtype}")
    if len(tok) and (int(tok.min()) < 0 or int(tok.max()) >= n_tokens):
        raise _fail(spec, f"token_index must be in 0..{n_tokens - 1}, got {int(tok.min())}..{int(tok.max())} ({where})")
    if len(exp) and (int(exp.min()) < 0 or int(exp.max()) >= num_experts):
        raise _fail(spec, f"expert_index must be in 0..{num_experts - 1}, got {int(exp.min())}..{int(exp.max())} ({where})")
    if expert_mask is not None and len(exp):
        banned = ~expert_mask.to(exp.device)[exp]
        if bool(banned.any()):
            bad = sorted(set(exp[banned].tolist()))
            raise _fail(spec, f"routed tokens to masked expert(s) {bad} ({where}); a masked expert must never receive a token")
    if not torch.isfinite(w).all():
        raise _fail(spec, f"Routing.weight contains NaN or inf ({where})")
    if len(w) and float(w.min()) < 0:
        raise _fail(spec, f"Routing.weight must be >= 0 (a gate scales an expert's output), got {float(w.min()):.4g} ({where})")
    if len(w):
        per_token = torch.zeros(n_tokens, dtype=torch.float64, device=w.device).index_add_(0, tok, w.double())
        if float(per_token.max()) > 1 + 1e-4:
            worst = int(per_token.argmax())
            raise _fail(
                spec,
                f"a token's gate weights must sum to at most 1, token {worst} gets {float(per_token[worst]):.4g} ({where}); "
                "normalise them (e.g. a softmax over experts)",
            )
    aux = getattr(routing, "aux_losses", {}) or {}
    if not isinstance(aux, Mapping):
        raise _fail(spec, f"Routing.aux_losses must be a dict name -> scalar tensor, got {type(aux).__name__}")
    for name, value in aux.items():
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.dim() > 1:
            raise _fail(spec, f"aux loss {name!r} must be a scalar tensor, got {_shape(value)}")
        if not torch.isfinite(value).all():
            raise _fail(spec, f"aux loss {name!r} is {float(value)} ({where})")
    stats = getattr(routing, "stats", {})
    if stats is not None and not isinstance(stats, Mapping):
        raise _fail(spec, f"Routing.stats must be a dict, got {type(stats).__name__}")


def check_router_module(
    spec: RouterSpec,
    module: nn.Module,
    d_model: int,
    num_experts: int,
    n_tokens: int = 8,
    expert_masks: list[torch.Tensor] | None = None,
) -> list[Any]:
    """Route ``[n_tokens, d_model]`` with every expert allowed and with the last one
    masked (or with ``expert_masks``); each result must pass :func:`check_routing`.
    Returns the Routing results."""
    device = module_device(module)
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(n_tokens, d_model, generator=gen).to(device, _float_dtype(module))
    results = []
    with checking(module), torch.no_grad():
        for mask in expert_masks or _expert_masks(num_experts, device):
            mask = mask.to(device)
            if list(mask.shape) != [num_experts]:
                raise ValueError(f"expert mask must be [{num_experts}], got {list(mask.shape)}")
            routing = _call(spec, f"forward(x [{n_tokens}, {d_model}], expert_mask={mask.int().tolist()})", module, x, mask)
            check_routing(spec, routing, n_tokens, num_experts, mask)
            results.append(routing)
    return results


def check_task_module(spec: TaskSpec, module: nn.Module, d_model: int, batch_size: int = 3, seq_len: int = 4):
    """The head maps ``tokens [B, T, d], mask [B, T]`` to a prediction with B rows;
    ``example_target`` matches ``target_shape``/``target_dtype``; the loss on them is a
    finite scalar; metrics are a dict of floats holding ``primary_metric``. Returns
    ``(pred, target, loss, metrics)``."""
    for attr in ("loss", "metrics", "example_target"):
        if not callable(getattr(module, attr, None)):
            raise _fail(spec, f"task head has no {attr}() method (see m3tfed.TaskHead)")
    target_shape = tuple(getattr(module, "target_shape", ()))
    target_dtype = getattr(module, "target_dtype", None)
    primary = getattr(module, "primary_metric", None)
    if not isinstance(getattr(module, "higher_is_better", None), bool):
        raise _fail(spec, f"higher_is_better must be a bool, got {getattr(module, 'higher_is_better', None)!r}")
    device = module_device(module)
    gen = torch.Generator().manual_seed(SEED)
    tokens = torch.randn(batch_size, seq_len, d_model, generator=gen).to(device, _float_dtype(module))
    mask = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
    mask[-1, seq_len // 2 :] = False  # some padding
    with checking(module), torch.no_grad():
        pred = _call(spec, f"forward(tokens [{batch_size}, {seq_len}, {d_model}], mask)", module, tokens, mask)
        if not isinstance(pred, torch.Tensor) or pred.dim() < 1 or pred.shape[0] != batch_size:
            raise _fail(spec, f"prediction must have B = {batch_size} rows, got {_shape(pred)}")
        if not torch.isfinite(pred).all():
            raise _fail(spec, "prediction contains NaN or inf")
        declared = getattr(module, "output_shape", None)
        if declared is not None and not (isinstance(declared, tuple | list) and all(isinstance(n, int) and n > 0 for n in declared)):
            raise _fail(spec, f"output_shape must be a tuple of positive ints (the per-sample prediction shape), got {declared!r}")
        if declared is not None and tuple(declared) != tuple(pred.shape[1:]):
            raise _fail(spec, f"output_shape is {tuple(declared)} but the prediction is {_shape(pred)} (B = {batch_size})")
        target = _call(spec, f"example_target({batch_size})", module.example_target, batch_size, gen)
        if not isinstance(target, torch.Tensor) or tuple(target.shape) != (batch_size, *target_shape):
            raise _fail(spec, f"example_target must be [B, *target_shape] = {[batch_size, *target_shape]}, got {_shape(target)}")
        if target.dtype != target_dtype:
            raise _fail(spec, f"example_target dtype must be target_dtype {target_dtype}, got {target.dtype}")
        target = target.to(device)
        loss = _call(spec, "loss(prediction, example_target)", module.loss, pred, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or loss.dim() > 0:
            raise _fail(spec, f"loss must be a scalar tensor, got {_shape(loss)} for prediction {_shape(pred)} and target {_shape(target)}")
        if not torch.isfinite(loss):
            raise _fail(spec, f"loss is {float(loss)} on example_target")
        metrics = _call(spec, "metrics(prediction, example_target)", module.metrics, pred, target)
    if not isinstance(metrics, Mapping):
        raise _fail(spec, f"metrics must return a dict name -> float, got {type(metrics).__name__}")
    not_float = {k: type(v).__name__ for k, v in metrics.items() if not isinstance(v, float | int) or isinstance(v, bool)}
    if not_float:
        raise _fail(spec, f"metrics must be plain floats (use float(x)), got {not_float}")
    if primary != "loss" and primary not in metrics:
        raise _fail(spec, f"primary_metric {primary!r} is not among its metrics {sorted(metrics)}")
    return pred, target, loss, metrics


# -- build + check -----------------------------------------------------------------------

_CHECKS = {"encoder": check_encoder_module, "expert": check_expert_module, "task": check_task_module}


def build_module(spec: Spec, d_model: int, num_experts: int | None = None, **options: Any) -> nn.Module:
    """``spec.build(d_model, **options)`` (routers: ``build(d_model, num_experts, ...)``);
    an exception or a non-module result becomes a ContractError naming the plugin."""
    args = (d_model, num_experts) if spec.kind == "router" else (d_model,)
    shown = ", ".join([*map(str, args), *(f"{k}={v!r}" for k, v in options.items())])
    module = _call(spec, f"build({shown})", spec.build, *args, **options)
    if not isinstance(module, nn.Module):
        raise _fail(spec, f"build({shown}) must return a torch.nn.Module, got {type(module).__name__}")
    return module


def check_module(spec: Spec, module: nn.Module, d_model: int, num_experts: int | None = None) -> None:
    """The shape/dtype contract of ``spec.kind`` on an already built module."""
    if spec.kind == "router":
        if num_experts is None:
            raise ValueError("checking a router needs num_experts")
        check_router_module(spec, module, d_model, num_experts)
    elif spec.kind in _CHECKS:
        _CHECKS[spec.kind](spec, module, d_model)
    else:
        raise ValueError(f"no module contract for {spec.kind} plugins")


def build_checked(spec: Spec, d_model: int, num_experts: int | None = None, **options: Any) -> nn.Module:
    """Build a plugin's module and check its contract; what the model builder calls.

    ``num_experts`` is required for routers and ignored otherwise. The parameter count
    is checked separately (:func:`check_param_count`) because it needs a build at
    ``REFERENCE_D_MODEL`` with default options.
    """
    if spec.kind == "router" and num_experts is None:
        raise ValueError(f"building router {spec.name!r} needs num_experts")
    module = build_module(spec, d_model, num_experts, **options)
    check_module(spec, module, d_model, num_experts)
    return module
