"""The M3T model: selected modality encoders -> tokens -> L x (attention + MoE FFN) -> task heads.

One institution's view of the global model. It instantiates only what the institution
selected (its modalities, its tasks, its experts); the router still scores the global
expert list, with unselected experts masked out, so every institution's router and
experts are interchangeable pieces of one federation.

Parameter names map onto federation components (:func:`component_of`):
``encoders.<m>.*`` -> ``encoder.<m>``, ``tasks.<t>.*`` -> ``task.<t>``,
``layers.<i>.moe.experts.<e>.*`` -> ``expert.<e>``, ``layers.<i>.moe.router.*`` ->
``router``, everything else -> ``trunk``. Frozen parameters belong to no component.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import Rule, setting
from .contracts import build_module, check_module, check_tokens
from .errors import ConfigError, ContractError, Instrumentation
from .interfaces import WideFeatures
from .modules import column_scales
from .moe import MoELayer
from .plugin_manager import get_catalogue
from .specs import Catalogue, ExpertSpec, Spec, check_options


@dataclass
class PluginConfig:
    """A plugin by name plus the options passed to its ``build``."""

    plugin: str = setting(doc="installed plugin name (`m3tfed plugins` lists them)")
    options: dict[str, Any] = setting(factory=dict, doc="passed to the plugin's `build`; the plugin checks them")


@dataclass
class TaskConfig(PluginConfig):
    """A task head plus, optionally, a linear term on raw inputs (wide and deep)."""

    wide: list[str] | None = setting(
        None,
        doc="modalities whose raw features (the encoder's `wide_features`) feed a linear term added to this head's output; "
        "zero at start, part of component `task.<task>`. Unset: the task plugin's default (`TaskSpec.wide`; `next_response` "
        "reads `interactions`) where the model's encoder of that modality offers wide features; [] for none",
    )
    wide_fit: Literal["joint", "residual"] = setting(
        "joint",
        doc="how the wide term learns: `joint`, with the deep head, on the loss of their sum; `residual`, on the deep head's "
        "residual (the sum's loss with the deep prediction held fixed) while the deep head learns on its own loss, exactly as "
        "with no term: the deep head and the shared parts get no gradient through the term, so it cannot take over what they "
        "would learn (the essays' term: docs/results.md, Learning quality 17)",
    )
    wide_scale: Literal["none", "local"] = setting(
        "none",
        doc="`local`: the wide features are centred and scaled by the mean and spread of each institution's own training split, "
        "computed there and never sent (as FedBN keeps normalization statistics local); columns holding only 0 and 1 stay as "
        "they are. For dense features that vary little (text statistics), not for sparse counts. An institution without "
        "statistics leaves the term out (it adds nothing to its predictions and learns nothing there): one under sample-level "
        "DP-SGD (statistics of its whole split would reach every sample's gradient, beyond DP-SGD's per-sample bound), or one "
        "with no training sample of the modality",
    )


def wide_modalities(config: ModelConfig, task: str, cat: Catalogue) -> list[str]:
    """The modalities whose wide features ``task``'s linear term reads: the config's
    ``wide``, or where it is unset the task plugin's default (``TaskSpec.wide``) among the
    model's encoders (``M3TModel`` skips one whose encoder offers no wide features)."""
    tc = config.tasks[task]
    if tc.wide is not None:
        return list(tc.wide)
    return [m for m in cat.get("task", tc.plugin).wide if m in config.encoders]


@dataclass
class ExpertConfig:
    """One expert slot of the MoE layers. ``modalities``/``tasks`` narrow who may select
    it (empty = the plugin's own tags; both empty = general purpose)."""

    name: str = setting(identifier=True, doc="component `expert.<name>`")
    plugin: str = setting("swiglu", doc="installed expert plugin")
    options: dict[str, Any] = setting(factory=dict, doc="passed to the plugin's `build` (e.g. `hidden`)")
    modalities: list[str] = setting(factory=list, doc="who may select it; empty = the plugin's own tags")
    tasks: list[str] = setting(factory=list, doc="who may select it; empty = the plugin's own tags")


@dataclass
class ModelConfig:
    d_model: int = setting(64, ge=1, doc="token width")
    n_layers: int = setting(2, ge=1, doc="transformer blocks, each with a MoE feed-forward")
    n_heads: int = setting(4, ge=1, doc="attention heads; must divide d_model")
    dropout: float = setting(0.0, ge=0, lt=1)
    router: PluginConfig = setting(factory=lambda: PluginConfig("topk", {"k": 2, "capacity_factor": 0}), doc="router plugin (component `router`); the default routes with no capacity limit, as the shipped configs do (docs/results.md, Learning quality 16)")
    encoders: dict[str, PluginConfig] = field(
        default_factory=dict, metadata={"doc": "modality -> encoder plugin (component `encoder.<modality>`)", "key": "modality", "rule": Rule(min_items=1, identifier=True)}
    )
    experts: list[ExpertConfig] = setting(factory=list, min_items=1, doc="expert slots of every MoE layer")
    tasks: dict[str, TaskConfig] = field(
        default_factory=dict, metadata={"doc": "task name -> task plugin (component `task.<task>`)", "key": "task", "rule": Rule(min_items=1, identifier=True)}
    )
    # Switch uses 1e-2 for load balancing, ST-MoE 1e-3 for the z-loss.
    aux_loss_weights: dict[str, float] = setting(factory=lambda: {"load_balance": 1e-2, "router_z": 1e-3}, ge=0, doc="router auxiliary loss -> weight")
    route_by_modality: bool = setting(True, doc="a modality's tokens go only to the institution's experts tagged with that modality or with none (the general ones), as modality experts do in VLMo and BEiT-3 (a modality with none of them selected routes among all); the task token to any. Off: the router picks among all the institution's experts")

    def __post_init__(self) -> None:
        # A task given as a bare PluginConfig (Python API) is a task without a wide term.
        self.tasks = {t: tc if isinstance(tc, TaskConfig) else TaskConfig(tc.plugin, tc.options) for t, tc in self.tasks.items()}

    def validate(self, path: str = "model") -> None:
        if self.d_model % self.n_heads:
            raise ConfigError(f"{path}.n_heads", f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if not self.experts:
            raise ConfigError(f"{path}.experts", "at least one expert is required")
        for key in ("encoders", "tasks"):
            if not getattr(self, key):
                raise ConfigError(f"{path}.{key}", f"at least one entry is required in model.{key}")
        for t, tc in self.tasks.items():
            unknown = [m for m in tc.wide or [] if m not in self.encoders]
            if unknown:
                raise ConfigError(f"{path}.tasks.{t}.wide", f"{unknown[0]!r} is not in model.encoders; known: {', '.join(self.encoders)}")
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{path}.experts", f"duplicate expert names: {', '.join(dupes)}")

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]


def expert_tags(cfg: ExpertConfig, spec: ExpertSpec) -> tuple[set[str], set[str]]:
    """(modalities, tasks) an expert serves: the config's tags, else the plugin's."""
    return set(cfg.modalities or spec.modalities), set(cfg.tasks or spec.tasks)


def _build(spec: Spec, path: str, d_model: int, options: dict[str, Any], num_experts: int | None = None, check: bool = True) -> nn.Module:
    """A plugin's module with its contract checked (shapes, dtypes, finite values, a
    router's gates), so a broken plugin fails at build naming itself and its package,
    not deep inside a round. Options the plugin rejects are a config error at ``<path>.options``."""
    check_options(spec, options, f"{path}.options", positional=2 if spec.kind == "router" else 1)
    try:
        module = build_module(spec, d_model, num_experts, **options)
    except ContractError as exc:
        raise ConfigError(f"{path}.options", str(exc)) from None
    if check:
        check_module(spec, module, d_model, num_experts)
    return module


def component_of(param_name: str) -> str:
    """The federation component a parameter belongs to."""
    parts = param_name.split(".")
    if parts[0] == "encoders":
        return f"encoder.{parts[1]}"
    if parts[0] == "tasks":
        return f"task.{parts[1]}"
    if parts[0] == "layers" and parts[2] == "moe":
        if parts[3] == "experts":
            return f"expert.{parts[4]}"
        if parts[3] == "router":
            return "router"
    return "trunk"


class ModelOutput(NamedTuple):
    pred: torch.Tensor
    aux_loss: torch.Tensor  # weighted sum of the routers' auxiliary losses
    aux_losses: dict[str, torch.Tensor]
    tokens_per_expert: torch.Tensor  # [E] long, summed over layers (global expert order)
    # eval mode only: modality -> [E] long, its tokens' assignments summed over layers
    tokens_per_modality: dict[str, torch.Tensor] = {}
    # with a wide term that applied to the batch: the head's output before it, and the term's
    deep_pred: torch.Tensor | None = None
    wide_pred: torch.Tensor | None = None


class EncoderSlot(nn.Module):
    """A modality encoder plus its modality embedding (added to every token)."""

    def __init__(self, encoder: nn.Module, d_model: int, name: str, package: str, path: str = "model.encoders"):
        super().__init__()
        self.encoder = encoder
        self.embed = nn.Parameter(torch.zeros(d_model))
        self.plugin, self.package, self.path = name, package, path

    def forward(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        with blame("encoder", self.plugin, self.package, self.path, "forward"):
            out = self.encoder(inputs)
        tokens, mask = check_tokens(out, self.embed.shape[0], "encoder", self.plugin, self.package)
        return tokens + self.embed, mask


class TaskSlot(nn.Module):
    """A task head plus its task embedding (the task token, also added to router input)
    and its wide term: one linear map per ``wide`` modality from that encoder's raw
    features to the head's output, zero at start so the head begins as configured;
    ``wide_fit`` and ``wide_scale`` as the task's config says (:class:`TaskConfig`)."""

    def __init__(self, head: nn.Module, d_model: int, name: str = "?", package: str = "", path: str = "model.tasks", wide_fit: str = "joint", wide_scale: str = "none"):
        super().__init__()
        self.head = head
        self.embed = nn.Parameter(torch.randn(d_model) * 0.02)
        self.wide = nn.ModuleDict()
        self.plugin, self.package, self.path = name, package, path
        self.wide_fit, self.wide_scale = wide_fit, wide_scale

    def add_wide(self, modality: str, width: int, d_model: int, where: str, can_run: bool) -> None:
        """A zero linear map ``[B, width] -> the head's output``, sized by the head's
        ``output_shape`` (checked at build with the head's contract) or a forward on zeros."""
        shape = getattr(self.head, "output_shape", None)
        if shape is None:
            if not can_run:
                raise ConfigError(where, f"task plugin {self.plugin!r} declares no output_shape, which its wide term needs in a model built without running its head (DeepSpeed ZeRO-3 ranks)")
            training = self.head.training
            try:  # eval: a probe must not move running statistics
                with torch.no_grad(), blame("task", self.plugin, self.package, self.path, "head forward"):
                    shape = self.head.eval()(torch.zeros(2, 1, d_model), torch.ones(2, 1, dtype=torch.bool)).shape[1:]
            finally:
                self.head.train(training)
        # No net draw from torch's global generator: adding a term changes no other
        # module's initial weights (so "with" and "without" differ by the term alone).
        with torch.random.fork_rng(devices=[]):
            linear = nn.Linear(width, math.prod(shape), bias=False)  # the head has the bias
        nn.init.zeros_(linear.weight)
        self.wide[modality] = linear


@contextlib.contextmanager
def blame(kind: str, plugin: str, package: str, path: str, call: str) -> Iterator[None]:
    """Where plugin code meets an institution's data (an encoder's forward, a head's
    loss): its exception becomes a ContractError naming the plugin, its package and its
    options key, which a backend reports once instead of retrying (it fails the same way
    each time). m3tfed's own hooks running inside (:class:`Instrumentation`, e.g. DP-SGD's
    per-sample probes) pass through as they are."""
    try:
        yield
    except (Instrumentation, ContractError):
        raise
    except Exception as exc:
        problem = f"{call} raised {type(exc).__name__}: {exc} (its options: {path}.options)"
        raise ContractError(kind, plugin, package, problem) from exc


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_heads)
        # Padding tokens are never attended to; every row has at least the task token.
        attn_mask = rearrange(mask, "b t -> b 1 1 t")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    """Pre-norm transformer block whose feed-forward is a mixture of experts."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, moe: MoELayer):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.moe = moe

    def forward(self, x, mask, task_embed, expert_mask, token_source=None, n_sources=0, source_masks=None):
        x = x + self.attn(self.norm1(x), mask)
        h = self.norm2(x)[mask]  # route real tokens only: [N, d]
        # The router sees the token plus the task, so routing can differ per task.
        router_input = h + task_embed
        out = self.moe(h, router_input=router_input, expert_mask=expert_mask, task=task_embed,
                       token_source=token_source, n_sources=n_sources, source_masks=source_masks)
        x = x.clone()
        x[mask] = x[mask] + out.y
        return x, out


class M3TModel(nn.Module):
    """One institution's instance of the global model.

    ``modalities``, ``tasks`` and ``experts`` select what is built locally (default: all
    in the config). Unselected experts are never built and never routed to.
    ``check_contracts=False`` skips running the plugins' contract checks, for a build
    whose parameters are not there yet (DeepSpeed ZeRO-3 ranks: partitioned, filled later).
    """

    def __init__(
        self,
        config: ModelConfig,
        modalities: list[str] | None = None,
        tasks: list[str] | None = None,
        experts: list[str] | None = None,
        catalogue: Catalogue | None = None,
        check_contracts: bool = True,
    ):
        """``check_contracts=False`` skips the build-time forward checks, for a process
        that rebuilds a model already checked elsewhere (a DeepSpeed rank under ZeRO-3
        init, where parameters are partitioned and cannot run a forward)."""
        super().__init__()
        cat = catalogue or get_catalogue()
        self.config = config
        d = config.d_model
        self.expert_names = config.expert_names
        modalities = list(config.encoders) if modalities is None else modalities
        tasks = list(config.tasks) if tasks is None else tasks
        experts = self.expert_names if experts is None else experts
        for kind, chosen, known in (("encoders", modalities, config.encoders), ("tasks", tasks, config.tasks), ("experts", experts, self.expert_names)):
            unknown = [c for c in chosen if c not in known]
            if unknown:
                raise ConfigError(f"model.{kind}", f"{unknown[0]!r} is not in the model config; known: {', '.join(known)}")

        # What was built: with the config, enough to build this model again (a tuning
        # run's tested states are read back by it: federation/tested.py).
        self.selection = {"modalities": list(modalities), "tasks": list(tasks), "experts": list(experts)}
        self.encoders = nn.ModuleDict()
        for m in modalities:
            pc = config.encoders[m]
            spec = cat.get("encoder", pc.plugin)
            self.encoders[m] = EncoderSlot(_build(spec, f"model.encoders.{m}", d, pc.options, check=check_contracts), d, spec.name, spec.package, f"model.encoders.{m}")
        self.tasks = nn.ModuleDict()
        wide_widths: dict[str, int] = {}  # modality -> its wide features' width
        for t in tasks:
            pc = config.tasks[t]
            spec = cat.get("task", pc.plugin)
            self.tasks[t] = TaskSlot(_build(spec, f"model.tasks.{t}", d, pc.options, check=check_contracts), d, spec.name, spec.package, f"model.tasks.{t}", pc.wide_fit, pc.wide_scale)
            for m in wide_modalities(config, t, cat):
                where = f"model.tasks.{t}.wide"
                if wide_widths.get(m) is None:  # asked again: an explicit term must fail where a default was skipped
                    wide_widths[m] = self._wide_width(m, cat, where, required=pc.wide is not None)
                if wide_widths[m] is not None:
                    self.tasks[t].add_wide(m, wide_widths[m], d, where, can_run=check_contracts)
            for key, value, default in (("wide_fit", pc.wide_fit, "joint"), ("wide_scale", pc.wide_scale, "none")):
                if value != default and not len(self.tasks[t].wide):
                    raise ConfigError(f"model.tasks.{t}.{key}", f"{value!r} applies to a wide term, and task {t!r} has none (set model.tasks.{t}.wide)")
        # modality -> (mean, scale) of its wide features at the institution this model
        # serves now (its own training split's: wide_statistics), for the tasks whose
        # wide_scale is "local"; a modality left out: that term is left out there. Set by
        # whoever loads an institution into the model (None until then: a local term
        # refuses to run); not a parameter or buffer, so in no component state, never sent.
        self.wide_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

        by_name = {e.name: e for e in config.experts}
        slots = {e.name: f"model.experts[{i}]" for i, e in enumerate(config.experts)}
        router_spec = cat.get("router", config.router.plugin)
        self.layers = nn.ModuleList()
        for layer in range(config.n_layers):
            # Every layer builds the same plugins with the same options: checking the
            # first layer's modules checks them all.
            check = check_contracts and layer == 0
            local = {n: _build(cat.get("expert", by_name[n].plugin), slots[n], d, by_name[n].options, check=check) for n in experts}
            router = _build(router_spec, "model.router", d, config.router.options, num_experts=len(self.expert_names), check=check)
            self.layers.append(Block(d, config.n_heads, config.dropout, MoELayer(d, self.expert_names, local, router)))
        self.norm = nn.LayerNorm(d)
        self.register_buffer("expert_mask", torch.tensor([n in experts for n in self.expert_names]), persistent=False)
        # route_by_modality: row 0 (the task token) may use any expert, row 1 + i (the
        # tokens of encoder i) the selected ones tagged with its modality or untagged.
        masks = None
        if config.route_by_modality:
            tags = {n: expert_tags(by_name[n], cat.get("expert", by_name[n].plugin))[0] for n in experts}
            rows = [[True] * len(self.expert_names)] + [[n in tags and (not tags[n] or m in tags[n]) for n in self.expert_names] for m in modalities]
            masks = torch.tensor(rows)
        self.register_buffer("source_masks", masks, persistent=False)

    def _wide_width(self, modality: str, cat: Catalogue, where: str, required: bool = True) -> int | None:
        """The width of ``modality``'s wide features, from its encoder (its contract
        check covers them); None where the encoder offers none and the term is only the
        task plugin's default (``required`` False). An institution without the modality
        builds the encoder only to read the width, so that every copy of a shared head
        has the same parameters: unchecked, and without drawing from torch's global
        generator."""
        path, pc = f"model.encoders.{modality}", self.config.encoders[modality]
        spec = cat.get("encoder", pc.plugin)
        if modality in self.encoders:
            encoder = self.encoders[modality].encoder
        else:
            with torch.random.fork_rng(devices=[]):
                encoder = _build(spec, path, self.config.d_model, pc.options, check=False)
        if not isinstance(encoder, WideFeatures):
            if not required:
                return None
            raise ConfigError(where, f"encoder plugin {spec.name!r} of {modality!r} offers no wide features (`wide_width`, `wide_features`)")
        return int(encoder.wide_width)

    def wide_statistics(self, split: dict[str, Any]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each wide feature's mean and scale (:func:`column_scales`) over the samples of
        ``split`` (an institution's training split) that have the modality, for the
        modalities a ``wide_scale = "local"`` term reads: what :attr:`wide_stats` holds."""
        present = split.get("present", {})
        out = {}
        for m in sorted({m for slot in self.tasks.values() if slot.wide_scale == "local" for m in slot.wide}):
            if m not in split or m not in self.encoders:
                continue
            with torch.no_grad():
                feats = self._wide_features(split, m).float().cpu()
            if m in present:
                feats = feats[present[m].bool().cpu()]
            if len(feats):
                out[m] = column_scales(feats)
        return out

    def _wide_features(self, batch: dict[str, Any], m: str) -> torch.Tensor:
        enc = self.encoders[m]
        with blame("encoder", enc.plugin, enc.package, enc.path, "wide_features"):
            return enc.encoder.wide_features(batch[m])

    def _add_wide(self, batch: dict[str, Any], slot: TaskSlot, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``pred`` plus the task's linear terms on the raw features of the wide
        modalities this batch has (scaled by :attr:`wide_stats` where the task's
        ``wide_scale`` is "local"), and those terms' sum (None: none applied); a sample
        without a modality gets no term from it."""
        present = batch.get("present", {})
        wide = None
        for m, linear in slot.wide.items():
            if m not in batch or m not in self.encoders:
                continue
            scaled = slot.wide_scale == "local"
            if scaled and self.wide_stats is None:
                raise RuntimeError(f"{slot.path}.wide_scale = 'local' needs the statistics of the institution this model serves (M3TModel.wide_stats, set by Institution.model())")
            if scaled and m not in self.wide_stats:
                continue  # none at this institution (DP-SGD, or no training sample of m): no term
            feats = self._wide_features(batch, m).to(linear.weight.device, linear.weight.dtype)
            if scaled:
                mean, scale = (t.to(feats.device, feats.dtype) for t in self.wide_stats[m])
                feats = (feats - mean) / scale
            if m in present:  # where, not a product: an absent sample's NaN stays out
                feats = torch.where(present[m].to(feats.device).bool().unsqueeze(1), feats, 0.0)
            term = linear(feats).reshape(pred.shape)
            pred, wide = pred + term, term if wide is None else wide + term
        return pred, wide

    # -- forward -----------------------------------------------------------------
    def embed(self, batch: dict[str, Any], task: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Tokens ``[B, T, d]``, mask and each position's source (0 for the task token,
        1 + the encoder's index for a modality's tokens) for the modalities in ``batch``.

        ``batch["present"][modality]`` (``[B]`` bool, optional) marks samples that have
        that modality; a modality absent from ``batch`` is absent for every sample.
        """
        present = batch.get("present", {})
        parts, masks, sources = [], [], [0]
        for i, (m, slot) in enumerate(self.encoders.items()):
            if m not in batch:
                continue
            tokens, mask = slot(batch[m])
            if m in present:
                mask = mask & present[m].to(mask.device).bool().unsqueeze(1)
            parts.append(tokens)
            masks.append(mask)
            sources += [i + 1] * tokens.shape[1]
        if not parts:
            raise ValueError(f"batch has none of this model's modalities {list(self.encoders)}; keys: {sorted(batch)}")
        B = parts[0].shape[0]
        task_token = self.tasks[task].embed.expand(B, 1, -1)
        x = torch.cat([task_token, *parts], dim=1)
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=x.device), *masks], dim=1)
        return x, mask, sources

    def forward(self, batch: dict[str, Any], task: str) -> ModelOutput:
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not built in this model; built: {list(self.tasks)}")
        x, mask, source = self.embed(batch, task)
        task_embed = self.tasks[task].embed
        aux: dict[str, torch.Tensor] = {}
        counts = torch.zeros(len(self.expert_names), dtype=torch.long)
        # In eval, also count where each modality's tokens go (routing_stats' per-token
        # I(modality; expert)); training skips the bookkeeping.
        counting = not self.training
        token_source = None  # the source of each real token, in the MoE layers' row order
        if counting or self.source_masks is not None:
            token_source = torch.tensor(source, device=x.device).expand(mask.shape)[mask]
        n_sources = 1 + len(self.encoders) if counting else 0
        per_source = torch.zeros(n_sources, len(self.expert_names), dtype=torch.long) if counting else None
        for block in self.layers:
            x, out = block(x, mask, task_embed, self.expert_mask, token_source, n_sources, self.source_masks)
            for k, v in out.aux_losses.items():
                aux[k] = aux.get(k, 0.0) + v / len(self.layers)
            tpe = out.stats.get("tokens_per_expert")
            if tpe is not None:
                counts += tpe.detach().to(counts.device).long()
            if counting:
                per_source += out.stats["tokens_per_source_expert"].to(per_source.device)
        x = self.norm(x)
        slot = self.tasks[task]
        with blame("task", slot.plugin, slot.package, slot.path, "head forward"):
            pred = slot.head(x, mask)
        deep = wide = None
        if len(slot.wide):
            deep = pred
            pred, wide = self._add_wide(batch, slot, pred)
        weights = self.config.aux_loss_weights
        aux_loss = sum((weights.get(k, 0.0) * v for k, v in aux.items()), torch.zeros(()))
        by_modality = {m: per_source[i + 1] for i, m in enumerate(self.encoders)} if counting else {}
        return ModelOutput(pred, aux_loss, aux, counts, by_modality, deep, wide)

    def loss(self, batch: dict[str, Any], task: str, target: torch.Tensor) -> tuple[torch.Tensor, ModelOutput]:
        out = self(batch, task)
        slot = self.tasks[task]
        with blame("task", slot.plugin, slot.package, slot.path, "loss"):
            if slot.wide_fit == "residual" and out.wide_pred is not None:
                # The wide term on the sum's loss with the deep prediction held fixed; the
                # deep head on its own loss, added as (own - own.detach()): its gradient
                # exactly, no value, so the loss reported stays the prediction's.
                own = slot.head.loss(out.deep_pred, target)
                loss = slot.head.loss(out.deep_pred.detach() + out.wide_pred, target) + (own - own.detach())
            else:
                loss = slot.head.loss(out.pred, target)
        return loss + out.aux_loss, out

    # -- federation view ----------------------------------------------------------
    def _component_params(self) -> dict[str, dict[str, nn.Parameter]]:
        """component -> trainable parameters, computed once (rounds call this often)."""
        if not hasattr(self, "_components_cache"):
            comps: dict[str, dict[str, nn.Parameter]] = {}
            for n, p in self.named_parameters():
                if p.requires_grad:
                    comps.setdefault(component_of(n), {})[n] = p
            self._components_cache = comps
        return self._components_cache

    def component_names(self) -> list[str]:
        return sorted(self._component_params())

    def component_state(self, component: str) -> dict[str, torch.Tensor]:
        """The trainable tensors of one component, keyed by parameter name."""
        return {n: p.detach().clone() for n, p in self._component_params().get(component, {}).items()}

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every component's trainable tensors (copies), by component: what a method keeps
        of a model and puts back."""
        return {c: self.component_state(c) for c in self.component_names()}

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Load the components ``state`` holds (as :meth:`trainable_state` gives them)."""
        for component, tensors in state.items():
            self.load_component_state(component, tensors)

    def load_component_state(self, component: str, state: dict[str, torch.Tensor]) -> None:
        params = self._component_params().get(component, {})
        for name, value in state.items():
            if name not in params:
                raise KeyError(f"component {component!r}: parameter {name!r} not in this model")
            if params[name].shape != value.shape:
                raise ValueError(f"component {component!r}: {name} has shape {tuple(value.shape)}, model expects {tuple(params[name].shape)}")
        with torch.no_grad():
            torch._foreach_copy_([params[n] for n in state], list(state.values()))


def interpolate(weight: float, federation: torch.Tensor, personal: torch.Tensor) -> torch.Tensor:
    """``weight`` x ``federation`` + (1 - ``weight``) x ``personal``; at either end that
    prediction itself (a diverged other one does not leak in as NaN)."""
    if weight == 1.0:
        return federation
    if weight == 0.0:
        return personal
    return weight * federation + (1.0 - weight) * personal


# The weights of the federation's model an interpolation tries, from all-federation down
# (ties keep the first: the more federated).
MIX_WEIGHTS = (1.0, 0.75, 0.5, 0.25, 0.0)
PERSONAL_PREFIX = "personal:"  # an interpolation's personal components in its trainable state


class InterpolatedModel(nn.Module):
    """Two models of one selection served as one: every prediction is ``weight`` x
    ``federation``'s + (1 - ``weight``) x ``personal``'s, in the head's output space
    (logits for classifiers, values for regression): the model interpolation of Mansour
    et al. 2020 ("Three approaches for personalization"). Routing counts are the
    federation model's, at any weight. Not trained as one: each part trains on its own.
    It starts in the federation model's mode (train or eval), which evaluation restores."""

    def __init__(self, federation: M3TModel, personal: M3TModel, weight: float):
        super().__init__()
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"an interpolation's weight is in [0, 1], not {weight}")
        self.federation, self.personal, self.weight = federation, personal, weight
        self.training = federation.training

    @property
    def config(self) -> ModelConfig:
        return self.federation.config

    @property
    def selection(self) -> dict[str, list[str]]:
        return self.federation.selection

    @property
    def tasks(self) -> nn.ModuleDict:
        return self.federation.tasks

    @property
    def expert_names(self) -> list[str]:
        return self.federation.expert_names

    def forward(self, inputs: dict[str, Any], task: str) -> ModelOutput:
        out = self.federation(inputs, task)
        if self.weight == 1.0:
            return out
        pred = interpolate(self.weight, out.pred, self.personal(inputs, task).pred)
        return out._replace(pred=pred, deep_pred=None, wide_pred=None)

    def component_names(self) -> list[str]:
        """Both parts' components, the personal part's prefixed (as in :meth:`trainable_state`)."""
        return [*self.federation.component_names(), *(PERSONAL_PREFIX + c for c in self.personal.component_names())]

    def trainable_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Both parts' trainable tensors: the personal part's components prefixed."""
        return {**self.federation.trainable_state(), **{PERSONAL_PREFIX + c: s for c, s in self.personal.trainable_state().items()}}

    def load_trainable_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for component, tensors in state.items():
            if component.startswith(PERSONAL_PREFIX):
                self.personal.load_component_state(component.removeprefix(PERSONAL_PREFIX), tensors)
            else:
                self.federation.load_component_state(component, tensors)
