"""Sample-level DP-SGD through Opacus, for institutions whose policy says ``dp = "sample"``.

Opacus does the privacy work: Poisson sampling (``UniformWithReplacementSampler``),
per-sample clipping and Gaussian noise (``DPOptimizer``), and the RDP accountant (its
optimizer hook steps it once per optimizer step). This module only supplies the
per-sample gradients, because the M3T model is not a stack of layers whose activations
keep the sample dimension first: the MoE block routes the flattened ``[N_tokens, d]``
real tokens, routers are plugins, and modality/task embeddings are bare parameters.
Opacus's hooks (and ghost clipping) need every parameterised layer to see ``[B, ...]``;
here they would see tokens, not samples. ``torch.func.vmap(grad(...))`` cannot run the
model either: boolean masks (real tokens), top-k capacity (``nonzero``) and the MoE's
split sizes (``.tolist()``) have data-dependent shapes, which vmap refuses.

A sample's gradient is the gradient of its own loss with the model run on that sample
alone: capacity is then per sample, so one student's tokens never change another's
routing. Each sample's loss is the sum of the institution's task losses on it (plus the
router's aux losses), the same objective plain training minimizes per batch. Two ways
to compute it (``per_sample=``):

- **loop** (:func:`per_sample_grads`, any model): one forward and backward per sample.
  Exact by definition, at the price of B small passes per step, mostly op overhead.
- **batched** (:func:`batched_per_sample_grads`, M3T models with the top-k router):
  one forward and one backward over the whole batch in which every sample is
  independent, so each activation gradient equals the one of the sample run alone;
  hooks then turn activations and their gradients into per-sample parameter
  gradients. What makes the batch independent: the top-k router is replaced, for this
  pass, by one that routes each sample's tokens with that sample's own capacity and
  priority order and averages per-sample aux losses (``_PerSampleTrace._route``); experts
  run on their tokens row by row (``dispatch="loop"``). Per-sample gradients come from
  closed forms for ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding``, the router gate
  and the modality/task embeddings (rows of expert inputs are mapped to their sample
  through the routing); any other module holding parameters is re-run per sample for
  them. Each call checks that the per-sample gradients sum to the batch gradient (a
  parameter use the hooks missed would break it), and :func:`dp_sgd_fit` compares the
  two methods once on two samples before trusting the batched one; either check
  failing falls back to the loop with a warning.

``"auto"`` (the default) takes the batched path where it applies and the loop elsewhere
(other routers, noisy routing, batch-coupled layers such as BatchNorm, experts that
mix rows). Under ``model.route_by_modality`` the MoE layer routes each source's tokens
separately; the batched pass does the same per sample (each sample's tokens of a source
with that sample's capacity, aux losses weighted by the source's share of the sample).

:class:`DPSGDTrainer` is the :class:`~m3tfed.interfaces.LocalTrainer` ``Institution``
picks when its policy says ``dp = "sample"``.

Not here: client-level DP (``dp.py``), the accountant itself (Opacus's).
"""

from __future__ import annotations

import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..data import model_inputs, num_samples, take
from ..errors import Instrumentation
from ..interfaces import LocalFit, LocalRun
from ..model import Block, EncoderSlot, M3TModel, TaskSlot
from ..modules import active_mask
from ..moe import MoELayer, source_groups
from ..specs import Routing
from ..training import PlainTrainer, make_optimizer, proximal_terms, timeout, tokens_by_expert

PerSample = Literal["auto", "batched", "loop"]


# The routing rule DP-SGD can replay per sample: a router class that routes by it declares
# ``per_sample_rule = PER_SAMPLE_RULE`` (softmax over the active experts' gate logits,
# per-token top-k, optional renormalization, capacity(N, k, E) with first choices first,
# load-balance and z aux losses) and exposes ``gate``, ``k``, ``renormalize``,
# ``capacity``, ``noise_std`` and ``num_experts``. Core asks for the capability; it never
# imports a router plugin.
PER_SAMPLE_RULE = "softmax_top_k_gate"


class UnsupportedModel(Instrumentation):
    """The batched per-sample path cannot run this model exactly; use the loop."""


class _NotPerSample(UnsupportedModel):
    """``module``'s parameters got no exact per-sample gradient (an input not split by
    sample, e.g. position ids ``[1, L]`` broadcast over the batch, or a parameter used
    outside any hook): re-run it, or its parent, per sample instead."""

    def __init__(self, module: nn.Module, message: str):
        super().__init__(message)
        self.module = module


# Per model: modules learnt to need a per-sample re-run (see _NotPerSample).
_RERUN: weakref.WeakKeyDictionary[nn.Module, set[nn.Module]] = weakref.WeakKeyDictionary()


def poisson_batches(split: dict[str, Any], sample_rate: float, generator: torch.Generator) -> Iterator[dict[str, Any]]:
    """Endless Poisson-sampled batches (each sample in with probability ``sample_rate``),
    drawn by Opacus's sampler; a batch may be empty."""
    n = num_samples(split)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=sample_rate, generator=generator)
    while True:
        for idx in sampler:
            yield take(split, torch.as_tensor(idx, dtype=torch.long))


def per_sample_grads(
    loss_of: Callable[[dict[str, Any]], torch.Tensor], batch: dict[str, Any], params: list[torch.nn.Parameter]
) -> list[torch.Tensor]:
    """``[B, *p.shape]`` gradient of ``loss_of(sample)`` for each sample of ``batch``
    (one backward per sample; parameters a sample does not reach get zeros)."""
    n = num_samples(batch)
    out = [p.new_zeros((n, *p.shape)) for p in params]
    for i in range(n):
        one = take(batch, torch.tensor([i]))
        grads = torch.autograd.grad(loss_of(one), params, allow_unused=True)
        for buf, g in zip(out, grads):
            if g is not None:
                buf[i] = g
    return out


def batched_per_sample_grads(
    model: nn.Module,
    loss_of: Callable[[nn.Module, dict[str, Any]], tuple[torch.Tensor, Any]],
    batch: dict[str, Any],
    params: list[torch.nn.Parameter],
) -> list[torch.Tensor]:
    """The same ``[B, *p.shape]`` gradients as :func:`per_sample_grads` with
    ``lambda one: loss_of(model, one)[0]``, from one batched forward and backward.

    ``loss_of(model, batch)`` must be the mean over samples of its value on each sample
    alone (true of :func:`batch_loss`: task losses are batch means, and the per-sample
    router averages the aux losses). Raises :class:`UnsupportedModel` where this cannot
    be exact; the model is left as it was either way."""
    n = num_samples(batch)
    if n == 0:
        return [p.new_zeros((0, *p.shape)) for p in params]
    rerun = _RERUN.setdefault(model, set())
    for _ in range(16):  # the first call on a model may learn a few modules to re-run
        try:
            return _batched(model, loss_of, batch, params, n, rerun)
        except _NotPerSample as exc:
            rerun.add(_rerun_target(model, exc.module, rerun, exc))
    raise UnsupportedModel("too many modules whose inputs are not split by sample")


_LEAVES = (nn.Linear, nn.LayerNorm, nn.Embedding)  # the layers with closed forms below


def _rerun_target(model: nn.Module, module: nn.Module, rerun: set[nn.Module], exc: Exception) -> nn.Module:
    """What to re-run per sample, whole, for ``module``'s parameters: itself, or (for a
    closed-form layer, or one already re-run) its closest called ancestor."""
    parents = {c: m for m in model.modules() for c in m.children()}
    target = module
    if isinstance(module, _LEAVES) or module in rerun:
        target = parents.get(module)
        while isinstance(target, (nn.ModuleList, nn.ModuleDict)):
            target = parents.get(target)
    inside_moe, up = False, target
    while up is not None:
        inside_moe |= isinstance(up, MoELayer)
        up = parents.get(up)
    # The model's own modules are handled by the hooks or not at all; experts and
    # routers only run on routed tokens, so re-running them per sample is not exact.
    if target is None or inside_moe or isinstance(target, (M3TModel, Block, EncoderSlot, TaskSlot)):
        raise UnsupportedModel(str(exc)) from exc
    return target


def _batched(model, loss_of, batch, params, n: int, rerun: set[nn.Module]) -> list[torch.Tensor]:
    with _PerSampleTrace(model, params, n, rerun) as trace:
        loss = loss_of(model, batch)[0] * n  # the sum of the per-sample losses
        summed = torch.autograd.grad(loss, params, allow_unused=True)
        trace.rerun_recorded()
    out = [trace.acc[p] if p in trace.acc else p.new_zeros((n, *p.shape)) for p in params]
    # A use of p that no hook saw (a bare parameter, a layer used functionally) is
    # missing from the per-sample gradients: their sum shows it.
    checked = [(p, g, t) for p, g, t in zip(params, out, summed) if p.numel()]
    if checked:
        err = torch.stack([(g.sum(0) - (0 if t is None else t)).abs().max() for _, g, t in checked])
        scale = torch.stack([g.abs().max() if t is None else torch.maximum(t.abs().max(), g.abs().max()) for _, g, t in checked])
        bad = (err > 1e-3 * scale + 1e-7).nonzero()
        if bad.numel():
            p = checked[int(bad[0])][0]
            owner = next(m for m in model.modules() if any(q is p for q in m.parameters(recurse=False)))
            raise _NotPerSample(owner, f"per-sample gradients of {type(owner).__name__} parameters do not sum to the batch gradient (off by {float(err[int(bad[0])]):.2e})")
    return out


# -- the batched pass ------------------------------------------------------------------
class _Rows:
    """The sample of each row of a token-major tensor (e.g. an expert's input), with
    the plan that scatters rows into a ``[B, R, .]`` buffer padded to the largest sample."""

    def __init__(self, sample: torch.Tensor, B: int):
        self.sample, self.B = sample, B
        self._plan: tuple[torch.Tensor, int] | None = None

    def _padding(self) -> tuple[torch.Tensor, int]:
        if self._plan is None:
            n = self.sample.numel()
            order = torch.argsort(self.sample, stable=True)
            srt = self.sample[order]
            counts = torch.bincount(srt, minlength=self.B)
            R = max(int(counts.max()), 1) if n else 1
            dest = torch.empty_like(order)
            dest[order] = srt * R + torch.arange(n, device=srt.device) - (torch.cumsum(counts, 0) - counts)[srt]
            self._plan = dest, R
        return self._plan

    def outer(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``[B, g_dim, x_dim]``: per sample, the sum over its rows of ``g[r] x[r]^T``."""
        dest, R = self._padding()
        gp = g.new_zeros(self.B * R, g.shape[1]).index_copy_(0, dest, g).view(self.B, R, -1)
        xp = x.new_zeros(self.B * R, x.shape[1]).index_copy_(0, dest, x).view(self.B, R, -1)
        return torch.bmm(gp.transpose(1, 2), xp)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``[n, *s] -> [B, *s]``: per sample, the sum over its rows."""
        return t.new_zeros(self.B, *t.shape[1:]).index_add_(0, self.sample, t)


class _PerSampleTrace:
    """Hooks that, during one batched pass, make every sample independent (per-sample
    routing, row-wise expert dispatch) and collect per-sample parameter gradients in
    ``acc`` (parameter -> ``[B, *shape]``). A context manager: leaving it removes every
    hook and restores the MoE layers' dispatch setting and per-source routing.

    ``rerun``: modules whose parameters (all of them, their children's included) come
    from re-running the module per sample rather than from the hooks inside it."""

    def __init__(self, model: nn.Module, params: list[torch.nn.Parameter], batch_size: int, rerun: set[nn.Module] = frozenset()):
        if not isinstance(model, M3TModel):
            raise UnsupportedModel(f"the batched path knows the M3T model only, got {type(model).__name__}")
        self.model, self.B, self.rerun = model, batch_size, rerun
        self.wanted = {p for p in params if p.requires_grad}
        self.acc: dict[torch.nn.Parameter, torch.Tensor] = {}
        self.recording = True
        self.rows: _Rows | None = None  # inside an expert: the sample of each input row
        self.tokens: _Rows | None = None  # the sample of each real token (the MoE's rows)
        self.task_embed: torch.Tensor | None = None
        self.recorded: list[dict[str, Any]] = []
        self._handles: list[Any] = []
        self._dispatch: list[tuple[MoELayer, str]] = []
        self._by_source: list[MoELayer] = []  # layers whose per-source routing is replaced

    def __enter__(self) -> _PerSampleTrace:
        try:
            self._install(self.model)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for moe, dispatch in self._dispatch:
            moe.dispatch = dispatch
        for moe in self._by_source:
            vars(moe).pop("_route_by_source", None)  # the class's method again
        self._handles, self._dispatch, self._by_source = [], [], []

    def add(self, p: torch.Tensor, g: torch.Tensor) -> None:
        """Add ``g [B, *p.shape]`` (a fresh tensor: it may be kept and added to)."""
        if p in self.wanted:
            if p in self.acc:
                self.acc[p].add_(g)
            else:
                self.acc[p] = g.detach()

    # -- installing ----------------------------------------------------------------
    def _install(self, module: nn.Module) -> None:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise UnsupportedModel("BatchNorm in training mode couples the samples of a batch")
        if module in self.rerun:
            self._handles.append(module.register_forward_hook(self._record_hook(whole=True), with_kwargs=True))
            return
        if isinstance(module, _LEAVES):
            self._handles.append(module.register_forward_hook(self._leaf_hook))
            return
        if isinstance(module, MoELayer):
            self._install_moe(module)
            return
        if isinstance(module, EncoderSlot):
            self._handles.append(module.register_forward_hook(self._slot_hook))
            self._install(module.encoder)
            return
        if isinstance(module, TaskSlot):  # its embedding: see _block_hook and _route
            self._install(module.head)
            self._install(module.wide)  # linear maps of [B, width] raw features
            return
        if isinstance(module, Block):
            self._handles.append(module.register_forward_pre_hook(self._block_hook))
        if next(module.parameters(recurse=False), None) is not None:
            # Bare parameters, used in ways no closed form here knows: re-run per sample.
            self._handles.append(module.register_forward_hook(self._record_hook(whole=False), with_kwargs=True))
        for child in module.children():
            self._install(child)

    def _install_moe(self, moe: MoELayer) -> None:
        router = moe.router
        if vars(type(router)).get("per_sample_rule") != PER_SAMPLE_RULE:
            raise UnsupportedModel(
                f"{type(router).__name__} does not declare per_sample_rule = {PER_SAMPLE_RULE!r}: per-sample routing "
                "is implemented for the softmax top-k gate rule only"
            )
        if router.training and router.noise_std > 0:
            raise UnsupportedModel("noisy routing draws different noise per pass")
        if router.gate.weight.dtype != torch.float32:
            raise UnsupportedModel("the router gate must be float32")
        for name, expert in moe.experts.items():
            if not getattr(expert, "moe_stackable", True):
                raise UnsupportedModel(f"expert {name} mixes tokens across rows")
        self._dispatch.append((moe, moe.dispatch))
        moe.dispatch = "loop"  # experts see only their own rows (the stacked path pads and vmaps)
        state: dict[str, Routing] = {}

        def route(mod, args, out):
            routing, per_sample = self._route(mod, args[0], args[1] if len(args) > 1 else None, self.tokens)
            state["routing"] = routing._replace(aux_losses={k: v.mean() for k, v in per_sample.items()})
            return state["routing"]

        def route_by_source(inp, mask, task, source, source_masks):
            # MoELayer._route_by_source, per sample: each source's tokens of a sample are
            # routed as that sample alone would route them, and a sample's aux losses are
            # its sources' weighted by their share of its tokens.
            tokens, parts, aux = self.tokens, [], {}
            if tokens is None or tokens.sample.numel() != inp.shape[0]:
                raise UnsupportedModel("router input rows do not match the block's real tokens")
            per_sample = torch.bincount(tokens.sample, minlength=self.B).clamp_min(1)
            for rows, allowed in source_groups(source, mask, source_masks):
                sub = _Rows(tokens.sample[rows], self.B)
                r, per = self._route(router, inp[rows], allowed, sub)
                parts.append((rows[r.token_index], r.expert_index, r.weight, r.stats["assignment_sample"]))
                share = torch.bincount(sub.sample, minlength=self.B) / per_sample
                for k, v in per.items():
                    aux[k] = aux.get(k, 0.0) + v * share
            token_index, expert_index, weight, sample = (torch.cat(t) for t in zip(*parts))
            state["routing"] = Routing(token_index, expert_index, weight, {k: v.mean() for k, v in aux.items()}, {"assignment_sample": sample})
            return state["routing"]

        self._handles.append(router.register_forward_hook(route))
        self._by_source.append(moe)
        moe._route_by_source = route_by_source  # shadows the method for this pass only
        for name, expert in moe.experts.items():
            e = moe.expert_names.index(name)

            def enter(mod, args, e=e):
                r = state["routing"]
                # The MoE layer hands expert e its assignments in routing order.
                self.rows = _Rows(r.stats["assignment_sample"][r.expert_index == e], self.B)

            def leave(mod, args, out):
                self.rows = None

            self._handles += [expert.register_forward_pre_hook(enter), expert.register_forward_hook(leave)]
            self._install(expert)

    # -- hooks ---------------------------------------------------------------------
    def _block_hook(self, block: Block, args: tuple) -> None:
        if not self.recording:
            return
        x, mask, task_embed = args[0], args[1], args[2]
        if mask.shape[0] != self.B:
            raise UnsupportedModel(f"block input has {mask.shape[0]} samples, expected {self.B}")
        self.tokens = _Rows(mask.nonzero()[:, 0], self.B)  # x[mask] order: the MoE's rows
        self.task_embed = task_embed
        if block is self.model.layers[0] and task_embed in self.wanted and x.requires_grad:
            # The task token: the task embedding broadcast to position 0 of every sample.
            x.register_hook(lambda g, p=task_embed: self.add(p, g[:, 0].clone()))

    def _slot_hook(self, slot: EncoderSlot, args: tuple, out: Any) -> None:
        tokens = out[0]
        if self.recording and slot.embed in self.wanted and tokens.requires_grad:
            # tokens = encoder tokens + embed, added to every token of every sample.
            tokens.register_hook(lambda g: self.add(slot.embed, g.sum(1)))

    def _leaf_hook(self, mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not self.recording or not out.requires_grad or not any(p in self.wanted for p in mod.parameters()):
            return
        x, rows = args[0].detach(), self.rows
        if rows is None and x.shape[0] != self.B or rows is not None and (x.dim() != 2 and not isinstance(mod, nn.Embedding) or x.shape[0] != rows.sample.numel()):
            raise _NotPerSample(mod, f"{type(mod).__name__} input {list(x.shape)} is not one row per sample ({self.B}) or per routed token")
        if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq or mod.sparse):
            raise UnsupportedModel("nn.Embedding with max_norm, scale_grad_by_freq or sparse")
        out.register_hook(lambda g: self._leaf_grads(mod, x, g, rows))

    def _leaf_grads(self, mod: nn.Module, x: torch.Tensor, g: torch.Tensor, rows: _Rows | None) -> None:
        B = self.B

        def per_sample_sum(t: torch.Tensor, trailing: int) -> torch.Tensor:
            # Sum over every dim but the sample (or row) and the last `trailing`.
            t = t.reshape(t.shape[0], -1, *t.shape[t.dim() - trailing :]).sum(1)
            return t if rows is None else rows.sum(t)

        if isinstance(mod, nn.Linear):
            if rows is None:
                x3, g3 = x.reshape(B, -1, x.shape[-1]), g.reshape(B, -1, g.shape[-1])
                self.add(mod.weight, torch.bmm(g3.transpose(1, 2), x3))
            else:
                self.add(mod.weight, rows.outer(g, x))
            if mod.bias is not None:
                self.add(mod.bias, per_sample_sum(g, 1))
        elif isinstance(mod, nn.LayerNorm):
            nd = len(mod.normalized_shape)
            if mod.weight is not None:
                self.add(mod.weight, per_sample_sum(g * F.layer_norm(x, mod.normalized_shape, None, None, mod.eps), nd))
            if mod.bias is not None:
                self.add(mod.bias, per_sample_sum(g, nd))
        else:  # nn.Embedding: scatter each looked-up row's gradient into its sample's table
            ids = x.reshape(x.shape[0], -1)
            owner = (torch.arange(B, device=ids.device) if rows is None else rows.sample).repeat_interleave(ids.shape[1])
            g2 = g.reshape(-1, g.shape[-1])
            if mod.padding_idx is not None:
                g2 = g2 * (ids.reshape(-1) != mod.padding_idx).unsqueeze(1).to(g2.dtype)
            V = mod.num_embeddings
            flat = g2.new_zeros(B * V, g2.shape[1]).index_add_(0, owner * V + ids.reshape(-1), g2)
            self.add(mod.weight, flat.view(B, V, -1))

    def _record_hook(self, whole: bool):
        """A forward hook keeping a call's inputs and, in the backward, its output
        gradients, for :meth:`rerun_recorded`."""

        def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            params = mod.parameters() if whole else mod.parameters(recurse=False)
            named = [(n, p) for n, p in (mod.named_parameters() if whole else mod.named_parameters(recurse=False)) if p in self.wanted]
            if not self.recording or not named or not any(True for _ in params):
                return
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            rec = {"module": mod, "named": named, "args": _detach(args), "kwargs": _detach(kwargs), "rows": self.rows, "grads": [None] * len(outs)}
            for j, t in enumerate(outs):
                t.register_hook(lambda g, j=j: rec["grads"].__setitem__(j, g.detach()))
            self.recorded.append(rec)

        return hook

    def rerun_recorded(self) -> None:
        """Per-sample gradients of the parameters only :meth:`_record_hook` saw: each
        recorded call is run again with the inputs held fixed and the parameters
        replaced by per-sample copies, then back from its recorded output gradients.
        Call after the backward."""
        self.recording = False
        try:
            for rec in self.recorded:
                if all(g is None for g in rec["grads"]):
                    continue
                per = None
                if rec["rows"] is None:
                    per = self._rerun_broadcast(rec)
                if per is None:
                    per = self._rerun_loop(rec)
                for (_, p), g in zip(rec["named"], per):
                    self.add(p, g)
        finally:
            self.recording = True

    def _rerun_broadcast(self, rec: dict[str, Any]) -> list[torch.Tensor] | None:
        """One call with each parameter stacked ``[B, *shape]``, so broadcasting hands
        sample b its own copy, or None where that does not hold. It holds when the
        parameter's uses broadcast from the right against ``[B, ...]`` activations
        (e.g. ``x * w`` with ``x [B, n, 1]``, ``w [n, d]``); it is checked on every call:
        with a random copy per sample, samples 0 and B-1 must get what they get alone."""
        mod, B = rec["module"], self.B
        names = [n for n, _ in rec["named"]]

        def call(values, args, kwargs):
            return tree_flatten(torch.func.functional_call(mod, dict(zip(names, values)), args, kwargs, strict=False))[0]

        try:
            with torch.no_grad():
                probe = [p.detach() + torch.randn((B, *p.shape), dtype=p.dtype, device=p.device) * (float(p.detach().abs().mean()) + 1e-2) for _, p in rec["named"]]
                together = call(probe, rec["args"], rec["kwargs"])
                for b in {0, B - 1}:
                    idx = torch.tensor([b])
                    alone = call([t[b] for t in probe], _select(rec["args"], idx, B), _select(rec["kwargs"], idx, B))
                    if len(alone) != len(together):
                        return None
                    for a, t in zip(alone, together):
                        if isinstance(a, torch.Tensor) and (t.shape[1:] != a.shape[1:] or t.shape[0] != B or not torch.allclose(t[b : b + 1], a, rtol=1e-4, atol=1e-5)):
                            return None
            copies = [p.detach().expand(B, *p.shape).clone().requires_grad_() for _, p in rec["named"]]
            with torch.enable_grad():
                outs = [t for t in call(copies, rec["args"], rec["kwargs"]) if isinstance(t, torch.Tensor) and t.requires_grad]
        except (RuntimeError, ValueError, IndexError, TypeError, UnsupportedModel):
            return None  # shapes that do not broadcast, or validation the copies trip
        if len(outs) != len(rec["grads"]):
            return None
        pairs = [(o, g) for o, g in zip(outs, rec["grads"]) if g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], copies, [g for _, g in pairs], allow_unused=True)
        return [torch.zeros_like(c) if g is None else g for c, g in zip(copies, grads)]

    def _rerun_loop(self, rec: dict[str, Any]) -> list[torch.Tensor]:
        """One call per sample (its rows, inside an expert)."""
        mod, rows = rec["module"], rec["rows"]
        params = [p for _, p in rec["named"]]
        per = [p.new_zeros((self.B, *p.shape)) for p in params]
        lead = self.B if rows is None else rows.sample.numel()
        for b in range(self.B):
            idx = torch.tensor([b]) if rows is None else (rows.sample == b).nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            try:
                args, kwargs = _select(rec["args"], idx, lead), _select(rec["kwargs"], idx, lead)
            except UnsupportedModel as exc:
                raise _NotPerSample(mod, str(exc)) from exc
            with torch.enable_grad():
                out = mod(*args, **kwargs)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if len(outs) != len(rec["grads"]):
                raise UnsupportedModel(f"{type(mod).__name__} returns different outputs for one sample")
            pairs = [(o, g[idx]) for o, g in zip(outs, rec["grads"]) if g is not None]
            grads = torch.autograd.grad([o for o, _ in pairs], params, [g for _, g in pairs], allow_unused=True)
            for buf, g in zip(per, grads):
                if g is not None:
                    buf[b] = g
        return per

    # -- per-sample top-k routing --------------------------------------------------
    def _route(self, router: nn.Module, x: torch.Tensor, expert_mask: torch.Tensor | None, tokens: _Rows | None) -> tuple[Routing, dict[str, torch.Tensor]]:
        """The softmax top-k gate rule (:data:`PER_SAMPLE_RULE`) over rows ``x`` whose
        samples are ``tokens``, with each sample's tokens routed as if alone: the same
        per-token top-k, but capacity ``capacity(N_b)`` and the drop priority (first
        choices, then token order) within each sample. Also returns the aux losses per
        sample (``[B]`` each): their mean keeps the batch loss the mean of sample losses."""
        B = self.B
        if tokens is None or tokens.sample.numel() != x.shape[0]:
            raise UnsupportedModel("router input rows do not match the block's real tokens")
        s = tokens.sample
        N, E = x.shape[0], router.num_experts
        mask = active_mask(expert_mask, E, x.device)
        n_active = int(mask.sum())
        k = min(router.k, n_active)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.float()
            raw = F.linear(xf, router.gate.weight.float())
        logits = raw.masked_fill(~mask, float("-inf"))
        probs = logits.softmax(dim=-1)
        top_e = logits.topk(k, dim=-1).indices
        top_w = probs.gather(1, top_e)
        if router.renormalize:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)

        # Assignments sorted by (sample, expert, rank, token): within each (sample,
        # expert) group that is the router's own priority order, rank-major.
        expert = top_e.t().reshape(-1)
        token = torch.arange(N, device=x.device).repeat(k)
        rank = torch.arange(k, device=x.device).repeat_interleave(N)
        weight = top_w.t().reshape(-1)
        sample = s[token]
        group = sample * E + expert
        order = torch.argsort((group * k + rank) * N + token)
        expert, token, weight, sample, group = expert[order], token[order], weight[order], sample[order], group[order]
        n_tokens = torch.bincount(s, minlength=B)
        wanted = torch.bincount(group, minlength=B * E)
        caps = [router.capacity(int(t), k, n_active) for t in n_tokens.tolist()]
        if any(c is not None for c in caps):
            cap = torch.tensor([N * k if c is None else c for c in caps], device=x.device)
            slot = torch.arange(group.numel(), device=x.device) - (torch.cumsum(wanted, 0) - wanted)[group]
            keep = (slot < cap[sample]).nonzero().squeeze(1)
            expert, token, weight, sample = expert[keep], token[keep], weight[keep], sample[keep]

        per_token = n_tokens.clamp_min(1).to(probs.dtype)
        f = wanted.view(B, E).float() / (n_tokens * k).clamp_min(1).unsqueeze(1)
        P = tokens.sum(probs) / per_token.unsqueeze(1)
        load_balance = n_active * (f * P).sum(1)
        router_z = tokens.sum(torch.logsumexp(logits, dim=-1) ** 2) / per_token

        if router.gate.weight in self.wanted and raw.requires_grad:
            raw.register_hook(lambda g: self.add(router.gate.weight, tokens.outer(g, xf.detach())))
        if self.task_embed is not None and self.task_embed in self.wanted and x.requires_grad:
            # router input = tokens + task embedding (Block.forward): its per-sample sum.
            p = self.task_embed
            x.register_hook(lambda g: self.add(p, tokens.sum(g)))
        stats = {"tokens_per_expert": torch.bincount(expert, minlength=E), "assignment_sample": sample}
        return Routing(token, expert, weight, {}, stats), {"load_balance": load_balance, "router_z": router_z}


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, tree)


def _select(tree: Any, idx: torch.Tensor, lead: int) -> Any:
    """Rows ``idx`` of every tensor (leading size ``lead``) and list in ``tree``."""
    if isinstance(tree, torch.Tensor):
        if tree.dim() == 0 or tree.shape[0] != lead:
            raise UnsupportedModel(f"cannot split a {list(tree.shape)} module input by sample")
        return tree[idx]
    if isinstance(tree, list) and len(tree) == lead and not any(isinstance(t, torch.Tensor) for t in tree):
        return [tree[i] for i in idx.tolist()]  # e.g. raw texts
    if isinstance(tree, (list, tuple)):
        items = [_select(t, idx, lead) for t in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, dict):
        return {k: _select(v, idx, lead) for k, v in tree.items()}
    return tree


def _check_against_loop(model, loss_of, batch, params, samples: int = 2) -> None:
    """Raise :class:`UnsupportedModel` unless the batched path gives the loop's
    per-sample gradients on the first ``samples`` samples of ``batch``."""
    sub = take(batch, torch.arange(min(samples, num_samples(batch))))
    fast = batched_per_sample_grads(model, loss_of, sub, params)
    ref = per_sample_grads(lambda one: loss_of(model, one)[0], sub, params)
    for p, a, b in zip(params, fast, ref):
        if not torch.allclose(a, b, rtol=1e-3, atol=1e-5):
            raise UnsupportedModel(f"batched per-sample gradients of a {tuple(p.shape)} parameter differ from the loop's by {float((a - b).abs().max()):.2e}")


def make_dp_optimizer(optimizer: torch.optim.Optimizer, noise_multiplier: float, clip_norm: float, expected_batch_size: int, accountant, sample_rate: float, generator: torch.Generator | None = None) -> DPOptimizer:
    """Opacus's DPOptimizer around ``optimizer``, stepping ``accountant`` on every step."""
    dp = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=clip_norm, expected_batch_size=max(1, expected_batch_size), loss_reduction="mean", generator=generator)
    dp.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return dp


def dp_sgd_fit(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    split: dict[str, Any],
    loss_of: Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    noise_multiplier: float,
    clip_norm: float,
    sample_rate: float,
    accountant,
    generator: torch.Generator,
    deadline: float | None = None,
    on_timeout: Callable[[], Exception] | None = None,
    per_sample: PerSample = "auto",
    proximal: Sequence[tuple[torch.nn.Parameter, torch.Tensor, float]] = (),
) -> tuple[float, torch.Tensor]:
    """``steps`` DP-SGD steps on Poisson-sampled batches of ``split``.

    ``proximal``: (parameter, anchor, mu) terms (FedProx, Ditto) whose gradient
    ``mu (w - w0)`` is added after clipping and noise: it reads no data, so it costs no
    privacy and must not be clipped with the data's gradient.

    ``loss_of(model, batch) -> (loss, tokens_per_expert)``. ``per_sample`` picks how
    per-sample gradients are computed (module docstring); ``"auto"`` checks the batched
    path against the loop once, on two samples, and falls back to the loop (with a
    warning) where it does not apply. Returns the mean (non-private, for logging only)
    batch loss and the tokens routed to each expert."""
    if per_sample not in ("auto", "batched", "loop"):
        raise ValueError(f"per_sample must be 'auto', 'batched' or 'loop', got {per_sample!r}")
    n = num_samples(split)
    dp = make_dp_optimizer(optimizer, noise_multiplier, clip_norm, round(sample_rate * n), accountant, sample_rate, generator)
    batches = poisson_batches(split, sample_rate, generator)
    model.train()
    method, checked = per_sample, per_sample != "auto"
    total, counts = 0.0, None
    for _ in range(steps):
        if deadline is not None and time.perf_counter() > deadline:
            raise on_timeout() if on_timeout else TimeoutError("DP-SGD ran past its deadline")
        batch = next(batches)
        b = num_samples(batch)
        dp.zero_grad(set_to_none=True)
        if b:
            with torch.no_grad():  # the logged loss and routing counts, one batched forward
                loss, tokens = loss_of(model, batch)
            total += float(loss)
            counts = tokens if counts is None else counts + tokens
            grads = None
            if method != "loop":
                try:
                    if not checked and b >= 2:
                        _check_against_loop(model, loss_of, batch, params)
                        checked = True
                    grads = batched_per_sample_grads(model, loss_of, batch, params)
                except Exception as exc:  # the loop is exact for any model: never worse off
                    if method == "batched":
                        raise
                    warnings.warn(f"DP-SGD: per-sample gradients by one backward per sample ({type(exc).__name__}: {exc})", stacklevel=2)
                    method = "loop"
            if grads is None:
                grads = per_sample_grads(lambda one: loss_of(model, one)[0], batch, params)
        else:  # an empty Poisson batch still takes a (pure-noise) step: the accountant counts it
            grads = [p.new_zeros((0, *p.shape)) for p in params]
        for p, g in zip(params, grads):
            p.grad_sample = g
        if dp.pre_step():  # clip, noise, charge (Opacus's DPOptimizer.step, split in two)
            with torch.no_grad():
                for p, w0, mu in proximal:
                    p.grad.add_(p - w0, alpha=mu)
            dp.original_optimizer.step()
    for p in params:  # leave no Opacus state on the shared model
        p.grad_sample = None
        p.grad = None
        if hasattr(p, "summed_grad"):
            p.summed_grad = None
    return total / max(steps, 1), counts


def batch_loss(tasks: list[str]) -> Callable[[torch.nn.Module, dict[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
    """The institution's objective on a batch: the sum of its task losses."""

    def loss_of(model, batch):
        inputs = model_inputs(batch)
        loss, tokens = torch.zeros(()), None
        for task in tasks:
            task_loss, out = model.loss(inputs, task, batch["targets"][task])
            loss = loss + task_loss
            tokens = out.tokens_per_expert if tokens is None else tokens + out.tokens_per_expert
        return loss, tokens

    return loss_of


class DPSGDTrainer:
    """Local training under a sample-level policy: :func:`dp_sgd_fit` with the
    institution's noise multiplier, clip norm, sample rate and accountant, and Poisson
    sampling and noise from its own (secret) generator, never the server's job seed.
    Each call charges the accountant one step per optimizer step and closes the round
    (``InstitutionPrivacy.end_round``). A fresh optimizer every call; a FedProx or Ditto
    pull (``LocalRun.anchor``) is added to the noisy gradient.

    ``LocalRun.only`` (personalizing a few components for this institution's own
    evaluation, nothing of which is sent) trains plainly and charges nothing."""

    name = "dp_sgd"
    keeps_optimizer_state = False

    def fit(self, institution: Any, model: M3TModel, run: LocalRun) -> LocalFit:
        # institution: an m3tfed.federation.institution.Institution (the layer above)
        if run.only is not None:
            return PlainTrainer().fit(institution, model, run)
        priv = institution.privacy
        if priv is None:
            raise ValueError(f"{institution.name}: DP-SGD needs the institution's privacy state (build_federation attaches it)")
        torch.manual_seed(run.seed)
        params = [p for p in model.parameters() if p.requires_grad]
        s = institution.settings
        opt = make_optimizer(model, params, run.lr, s.optimizer, s.weight_decay)
        loss, counts = dp_sgd_fit(
            model, params, institution.data.train, batch_loss(institution.config.tasks), opt, run.steps,
            priv.noise_multiplier, priv.policy.clip_norm, priv.sample_rate, priv.accountant,
            priv.generator("dp_sgd", run.seed), run.deadline, lambda: timeout(institution),
            proximal=proximal_terms(model, run),
        )  # fmt: skip
        priv.end_round()
        return LocalFit(loss, tokens_by_expert(model, counts))
