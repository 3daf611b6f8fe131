"""The MoE layer: route tokens, dispatch them to their experts, combine the outputs.

The router (a plugin) turns tokens into a flat list of (token, expert, weight)
assignments (:class:`m3tfed.Routing`); this layer sorts the assignments by expert, runs
each expert once on its contiguous slice of tokens and adds the gate-weighted outputs
back with ``index_add``. No Python loop ever runs over tokens, only over experts.

Experts are arbitrary plugin modules mapping ``[n, d] -> [n, d]`` row by row, possibly
of different classes in one layer. Two ways to run them:

- **loop** (any expert): one call per expert on its ragged slice of tokens.
- **stacked** (homogeneous experts: same class, same parameter shapes, no buffers):
  their parameters are stacked and ``torch.func.vmap(functional_call)`` runs them as
  one batched call over a ``[G, C, d]`` buffer padded to the busiest expert. A constant
  number of kernels whatever the number of experts, at the price of the padding and
  a copy of the weights. ``dispatch="auto"`` picks per group and call (see
  :attr:`MoELayer.STACKED_MAX_PADDING`); a group vmap cannot run falls back to the loop.

Not here: choosing experts (routers are plugins), building experts (the model asks the
plugin manager), or multi-device expert parallelism.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import torch
from einops import rearrange
from torch import nn
from torch.func import functional_call, vmap

from .errors import ContractError
from .specs import Routing

__all__ = ["MoELayer", "MoEOutput"]

Dispatch = Literal["auto", "loop", "stacked"]


class MoEOutput(NamedTuple):
    y: torch.Tensor  # [N, d]
    aux_losses: dict[str, torch.Tensor]  # the router's, e.g. load_balance, router_z
    stats: dict[str, Any]  # the router's, plus tokens_per_expert [E] and dispatch


def _stack_signature(module: nn.Module) -> tuple | None:
    """Experts with equal signatures can run as one vmapped call; None = never stack.

    Buffers are excluded (running statistics would be stacked copies, not updated in
    place); a module can opt out with ``moe_stackable = False`` (e.g. an expert that
    mixes tokens across rows, for which padding rows would change the result).
    """
    if not getattr(module, "moe_stackable", True) or next(module.buffers(), None) is not None:
        return None
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters())
    return (type(module), params) if params else None


def source_groups(source: torch.Tensor, mask: torch.Tensor, source_masks: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each source present in ``source [N]``: its token rows and the experts they may
    take (``mask`` and the source's row of ``source_masks``; a source left with no expert
    keeps ``mask``). Routing by source is this loop, in the layer and in DP-SGD's trace."""
    for s in torch.unique(source).tolist():
        rows = (source == s).nonzero().squeeze(1)
        allowed = mask & source_masks[s].to(mask.device)
        yield rows, allowed if bool(allowed.any()) else mask


class MoELayer(nn.Module):
    """Route, dispatch, combine.

    Args:
        d_model: token width.
        expert_names: the GLOBAL expert list; the router scores ``len(expert_names)``
            experts in this fixed order, whichever are built here.
        experts: the experts instantiated locally (a subset of ``expert_names``), kept
            in ``self.experts`` in global order. The others are masked out.
        router: a module ``forward(x [N, d], expert_mask [E] bool) -> Routing``.
        dispatch: ``"auto"`` (default), ``"loop"`` or ``"stacked"`` (see the module
            docstring); ``"stacked"`` still loops over experts that cannot stack.
    """

    # When "auto" stacks a homogeneous group (SwiGLU experts, 2 AVX2 cores, torch 2.13):
    # - when padding to the busiest expert adds at most STACKED_MAX_PADDING x the rows.
    #   Stacked, a group costs a constant number of kernels whatever E is; looped, about
    #   E times as many. With other jobs on the cores each kernel can wait a scheduler
    #   slice, and at 4k tokens, E = 8-16, d = 256-512 the loop ran 1.3-2.4x slower than
    #   stacked. On an idle machine the loop was 5-25% faster (no padding, no weight
    #   copy): pass dispatch="loop" there. On GPUs fewer kernels is the usual win too;
    # - or when experts get so few rows that per-call overhead dominates anyway
    #   (mean rows x d_model <= STACKED_MAX_WORK): ~2x faster at the default model size.
    STACKED_MAX_PADDING = 1.5
    STACKED_MAX_WORK = 8192

    def __init__(
        self,
        d_model: int,
        expert_names: list[str],
        experts: dict[str, nn.Module],
        router: nn.Module,
        dispatch: Dispatch = "auto",
    ):
        super().__init__()
        if len(set(expert_names)) != len(expert_names):
            raise ValueError(f"expert_names has duplicates: {expert_names}")
        unknown = [n for n in experts if n not in expert_names]
        if unknown:
            raise ValueError(f"experts {unknown} are not in the global expert list {expert_names}")
        n_router = getattr(router, "num_experts", len(expert_names))
        if n_router != len(expert_names):
            raise ValueError(f"router scores {n_router} experts but the layer has {len(expert_names)}: {expert_names}")
        if dispatch not in ("auto", "loop", "stacked"):
            raise ValueError(f"dispatch must be 'auto', 'loop' or 'stacked', got {dispatch!r}")
        self.d_model = d_model
        self.expert_names = list(expert_names)
        self.experts = nn.ModuleDict({n: experts[n] for n in expert_names if n in experts})
        self.router = router
        self.dispatch = dispatch
        self.register_buffer("local_mask", torch.tensor([n in experts for n in expert_names]), persistent=False)

        # Group the local experts that can stack; each group gets consecutive "slots", so
        # after sorting assignments by slot every group's tokens are one contiguous slice.
        groups: dict[Any, list[int]] = {}
        for i, name in enumerate(self.expert_names):
            if name in self.experts:
                sig = _stack_signature(self.experts[name])
                groups.setdefault(sig if sig is not None else ("single", i), []).append(i)
        self._groups = list(groups.values())
        self._stackable = [len(g) > 1 and _stack_signature(self.experts[expert_names[g[0]]]) is not None for g in self._groups]
        expert_of_slot = [i for g in self._groups for i in g]
        expert_of_slot += [i for i in range(len(expert_names)) if i not in expert_of_slot]  # never routed to
        slot_of_expert = torch.empty(len(expert_names), dtype=torch.long)
        slot_of_expert[torch.tensor(expert_of_slot, dtype=torch.long)] = torch.arange(len(expert_names))
        self.register_buffer("slot_of_expert", slot_of_expert, persistent=False)

    def forward(self, x: torch.Tensor, router_input: torch.Tensor | None = None, expert_mask: torch.Tensor | None = None, task: torch.Tensor | None = None, token_source: torch.Tensor | None = None, n_sources: int = 0, source_masks: torch.Tensor | None = None) -> MoEOutput:
        """``x [N, d]`` (valid tokens only); ``router_input [N, d]`` defaults to ``x``;
        ``expert_mask [E]`` bool further restricts the experts built here; ``task [d]``
        (the task embedding) goes to a router that declares ``takes_task``;
        ``token_source [N]`` (long: where each token came from) with ``n_sources > 0``
        adds ``stats["tokens_per_source_expert"]`` ``[n_sources, E]``, assignments
        counted; with ``source_masks [S, E]`` bool it restricts each source's tokens
        further (a source left with no expert keeps the layer's mask): the router runs
        once per source present, and the experts once on all tokens."""
        if x.dim() != 2 or x.shape[1] != self.d_model:
            raise ValueError(f"MoELayer expects x [N, {self.d_model}], got {list(x.shape)}")
        mask = self.local_mask
        if expert_mask is not None:
            mask = mask & expert_mask.to(device=mask.device, dtype=torch.bool)
        if not bool(mask.any()):
            raise ValueError(f"no expert is both selected and built here; built: {list(self.experts)}")
        inp = x if router_input is None else router_input
        if source_masks is None or token_source is None or x.shape[0] == 0:
            routing = self._route(inp, mask, task)
        else:
            routing = self._route_by_source(inp, mask, task, token_source, source_masks)
        y, counts, modes = self._dispatch(x, routing, mask)
        stats = dict(routing.stats or {})
        stats["tokens_per_expert"] = torch.tensor(counts, dtype=torch.long)
        stats["dispatch"] = "+".join(sorted(modes)) or "none"
        if token_source is not None and n_sources > 0:
            E = len(self.expert_names)
            pair = token_source[routing.token_index] * E + routing.expert_index
            stats["tokens_per_source_expert"] = torch.bincount(pair, minlength=n_sources * E).view(n_sources, E)
        return MoEOutput(y, dict(routing.aux_losses or {}), stats)

    def _route(self, inp: torch.Tensor, mask: torch.Tensor, task: torch.Tensor | None) -> Routing:
        if task is not None and getattr(self.router, "takes_task", False):
            return self.router(inp, mask, task=task)
        return self.router(inp, mask)

    def _route_by_source(self, inp: torch.Tensor, mask: torch.Tensor, task: torch.Tensor | None, source: torch.Tensor, source_masks: torch.Tensor) -> Routing:
        """One routing over every token: each source's tokens routed among its experts.
        Aux losses are the sources' weighted by their share of the tokens; the router's
        other statistics (drops, gate entropy) are per call and not kept."""
        parts, aux, N = [], {}, inp.shape[0]
        for rows, allowed in source_groups(source, mask, source_masks):
            r = self._route(inp[rows], allowed, task)
            parts.append((rows[r.token_index], r.expert_index, r.weight))
            for k, v in (r.aux_losses or {}).items():
                aux[k] = aux.get(k, 0.0) + v * (len(rows) / N)
        token_index, expert_index, weight = (torch.cat(t) for t in zip(*parts))
        return Routing(token_index, expert_index, weight, aux, {})

    # -- dispatch ------------------------------------------------------------------
    def _dispatch(self, x: torch.Tensor, routing: Routing, mask: torch.Tensor) -> tuple[torch.Tensor, list[int], set[str]]:
        """Run every expert once on its tokens; returns y, assignments per expert, modes used."""
        N, d, E = x.shape[0], x.shape[1], len(self.expert_names)
        counts = torch.bincount(routing.expert_index, minlength=E).tolist()  # the one host sync: split sizes
        allowed = mask.tolist()
        if len(counts) > E or any(c and not ok for c, ok in zip(counts, allowed)):
            bad = [i for i, c in enumerate(counts) if c and (i >= E or not allowed[i])]
            names = [self.expert_names[i] if i < E else str(i) for i in bad]
            raise ContractError(
                "router", type(self.router).__name__, type(self.router).__module__,
                f"routed tokens to experts {names} that are masked or not built here; allowed: "
                f"{[n for n, ok in zip(self.expert_names, allowed) if ok]}",
            )

        # Group assignments by expert (slot order: every stack group is one contiguous span).
        order = torch.argsort(self.slot_of_expert[routing.expert_index], stable=True)
        token_index, weight = routing.token_index[order], routing.weight[order].to(x.dtype)

        # Row N of y collects the stacked path's padding rows and is cut off at the end.
        y = x.new_zeros(N + 1, d)
        modes: set[str] = set()
        looped: list[tuple[slice, list[tuple[int, int]]]] = []
        start = 0
        for g, group in enumerate(self._groups):
            used = [(i, counts[i]) for i in group if counts[i]]  # an expert without tokens is not called
            rows = sum(c for _, c in used)
            span = slice(start, start + rows)
            start += rows
            if not rows:
                continue
            if self._stackable[g] and len(used) > 1 and self._use_stacked(rows, [c for _, c in used]):
                try:
                    dest, out = self._run_stacked(
                        [self.experts[self.expert_names[i]] for i, _ in used], x, token_index[span], weight[span], [c for _, c in used]
                    )
                except Exception as exc:  # e.g. an expert forward that vmap cannot trace
                    if self.dispatch == "stacked":
                        raise
                    self._stackable[g] = False
                    cls = type(self.experts[self.expert_names[group[0]]]).__name__
                    warnings.warn(f"MoELayer: experts of class {cls} cannot run stacked ({type(exc).__name__}: {exc}); looping over them instead", stacklevel=3)
                else:
                    y.index_add_(0, dest, out)
                    modes.add("stacked")
                    continue
            looped.append((span, used))

        if looped:
            # One gather and one scatter for every looped expert together; one call per expert.
            if len(looped) == 1:
                rows_idx = looped[0][0]
            else:
                rows_idx = torch.cat([torch.arange(s.start, s.stop, device=x.device) for s, _ in looped])
            tok, w = token_index[rows_idx], weight[rows_idx]
            used = [u for _, us in looped for u in us]
            chunks = x.index_select(0, tok).split([c for _, c in used])
            out = torch.cat([self.experts[self.expert_names[i]](chunk) for (i, _), chunk in zip(used, chunks)])
            y.index_add_(0, tok, out * rearrange(w, "m -> m 1"))
            modes.add("loop")
        return y[:N], counts, modes

    def _use_stacked(self, rows: int, counts: list[int]) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "stacked"
        padded = len(counts) * max(counts)
        return padded <= self.STACKED_MAX_PADDING * rows or rows / len(counts) * self.d_model <= self.STACKED_MAX_WORK

    @staticmethod
    def _run_stacked(
        experts: list[nn.Module], x: torch.Tensor, tok: torch.Tensor, w: torch.Tensor, counts: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run G same-shaped experts as one vmapped call on a [G, C, d] buffer padded to
        the busiest expert. Returns (destination row of y, gated output) per buffer row.

        Padding rows read token 0 (a real row: no zero buffer to fill and copy into),
        get gate 0 and land in y's discarded row N, so, the expert's output on them
        being finite, they change neither the output nor any gradient. The parameters are stacked with ``torch.stack`` (a
        copy inside the graph, not new leaves): autograd still delivers gradients to
        each expert's own parameters."""
        G, C, N = len(experts), max(counts), x.shape[0]
        sizes = torch.tensor(counts, device=tok.device)
        which = torch.repeat_interleave(torch.arange(G, device=tok.device), sizes)  # row -> expert
        flat = which * C + torch.arange(len(tok), device=tok.device) - (torch.cumsum(sizes, 0) - sizes)[which]
        src = tok.new_zeros(G * C).index_copy(0, flat, tok)
        dest = tok.new_full((G * C,), N).index_copy(0, flat, tok)
        gate = w.new_zeros(G * C).index_copy(0, flat, w)
        buf = rearrange(x.index_select(0, src), "(g c) d -> g c d", g=G)
        named = [dict(e.named_parameters()) for e in experts]
        params = {name: torch.stack([p[name] for p in named]) for name in named[0]}
        template = experts[0]
        out = vmap(lambda p, b: functional_call(template, p, (b,)), randomness="different")(params, buf)
        return dest, rearrange(out, "g c d -> (g c) d") * rearrange(gate, "m -> m 1")
