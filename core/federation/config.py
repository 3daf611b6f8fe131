"""The federation config: model, rounds, strategies, data source and institutions.

Institutions choose experts by their modalities, tasks and compute budget
(:func:`resolve_selection`); the server and every backend use the same resolution, so
what an institution trains is decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import apply_overrides, from_dict, load_toml
from ..errors import ConfigError
from ..model import ExpertConfig, ModelConfig, PluginConfig, expert_tags
from ..privacy.policy import PolicyConfig, resolve_policies
from ..registry import Registry
from ..specs import Catalogue

COMPONENT_GROUPS = ("encoder", "expert", "router", "trunk", "task")
# Experts an institution trains by default, by compute tier (None = every matching one).
# Each expert costs download, upload, optimizer state and memory, whatever k is.
COMPUTE_EXPERT_BUDGET: dict[str, int | None] = {"small": 2, "base": 4, "large": None}


@dataclass
class DeepSpeedSettings:
    """Local training sharded over several processes with DeepSpeed ZeRO (see
    docs/deepspeed.md and :mod:`m3tfed.federation.zero`), for a backbone too large for
    one device. Only trainable components come back; the server sees no difference."""

    processes: int = 2  # ranks on the institution's machine: one per GPU, or per few CPU cores
    # 3 partitions every parameter (the frozen backbone too); 1-2 only optimizer state / gradients.
    zero_stage: int = 3
    # Merged over the generated DeepSpeed config (e.g. {"zero_optimization": {"offload_param": ...}}).
    config: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str = "deepspeed") -> None:
        if self.processes < 1:
            raise ConfigError(f"{path}.processes", f"must be >= 1, got {self.processes}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{path}.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        for key in ("optimizer", "scheduler"):  # m3tfed passes its own (federation.optimizer, lr)
            if key in self.config:
                raise ConfigError(f"{path}.config.{key}", "is set by m3tfed from federation.optimizer and federation.lr; remove it")
        zero = self.config.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ConfigError(f"{path}.config.zero_optimization", f"expected a table, got {type(zero).__name__}")
        stage = zero.get("stage", self.zero_stage)
        if stage != self.zero_stage:
            raise ConfigError(f"{path}.config.zero_optimization.stage", f"{stage} contradicts zero_stage = {self.zero_stage}; set zero_stage only")


@dataclass
class InstitutionConfig:
    name: str
    modalities: list[str]
    tasks: list[str]
    # "small" institutions get only small experts (low-rank), so they can take part at all.
    compute: Literal["small", "base", "large"] = "base"
    memory_mb: float | None = None  # experts whose registry min_memory_mb exceeds this are skipped
    experts: list[str] | None = None  # explicit choice; default: resolved from tags and compute
    # How many experts it trains; default by compute (COMPUTE_EXPERT_BUDGET). 0 = no limit.
    max_experts: int | None = None
    # Components that never leave the institution (e.g. "router", "task.grade", "expert.private").
    personal: list[str] = field(default_factory=list)
    # Privacy: a regulation profile plus overrides (m3tfed.privacy.policy; docs/privacy.md).
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Train locally with DeepSpeed ZeRO over several processes; None = in this process.
    deepspeed: DeepSpeedSettings | None = None


@dataclass
class FederationSettings:
    fraction: float = 1.0  # of institutions sampled per round
    min_institutions: int = 2  # a round needs at least this many successful institutions
    max_retries: int = 1  # a round with too few successes is retried this often
    local_steps: int = 10
    local_epochs: float | None = None  # if set, overrides local_steps per institution
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.0
    optimizer: Literal["adamw", "sgd"] = "adamw"
    timeout_s: float = 120.0  # per institution per round
    # Weight an expert's update by the tokens routed to it (Flower's weighted_by_key idea) or by samples.
    weight_experts_by: Literal["tokens", "samples"] = "tokens"
    backend: PluginConfig = field(default_factory=lambda: PluginConfig("simulation"))
    # Update pipeline stages (plugins of kind "stage"), e.g. ["clip"]; privacy stages plug in here.
    pipeline: list[PluginConfig] = field(default_factory=list)
    personalize_steps: int = 20  # local fine-tuning of router + heads for the "personalized" model


@dataclass
class EvaluationSettings:
    # The compared methods (m3tfed.federation.baselines); `m3tfed run --protocol` runs them all.
    baselines: list[Literal["local", "dense_fedavg", "fedprox", "fedavg_ft", "ditto", "centralized", "classical_pooled", "classical_local"]] = field(
        default_factory=lambda: ["local", "dense_fedavg", "classical_pooled"]
    )
    personalize: bool = True
    plots: bool = True
    # Learning curves and early stopping read the validation split every `every` rounds
    # (and after the last), on at most `val_samples` samples per institution (None = all).
    every: int = 1
    val_samples: int | None = None
    # "best": the round with the lowest mean validation loss is the one tested; "last": the last.
    keep: Literal["best", "last"] = "best"


@dataclass
class FederationConfig:
    name: str = "federation"
    seed: int = 0
    rounds: int = 10
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationSettings = field(default_factory=FederationSettings)
    # component group ("encoder", "expert", "router", "trunk", "task", or "default") -> aggregator
    aggregation: dict[str, PluginConfig] = field(default_factory=lambda: {"default": PluginConfig("fedavg")})
    data: PluginConfig = field(default_factory=lambda: PluginConfig("synthetic"))
    institutions: list[InstitutionConfig] = field(default_factory=list)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)

    def validate(self, path: str = "") -> None:
        if self.rounds < 1:
            raise ConfigError("rounds", "must be >= 1")
        if not self.institutions:
            raise ConfigError("institutions", "at least one institution is required")
        names = [i.name for i in self.institutions]
        if len(set(names)) != len(names):
            raise ConfigError("institutions", f"duplicate institution names in {names}")
        f = self.federation
        if not 0 < f.fraction <= 1:
            raise ConfigError("federation.fraction", f"must be in (0, 1], got {f.fraction}")
        if f.min_institutions > len(self.institutions):
            raise ConfigError("federation.min_institutions", f"{f.min_institutions} exceeds the {len(self.institutions)} institutions")
        for key in self.aggregation:
            if key not in (*COMPONENT_GROUPS, "default"):
                raise ConfigError(f"aggregation.{key}", f"unknown component group; allowed: default, {', '.join(COMPONENT_GROUPS)}")
        for i, inst in enumerate(self.institutions):
            for m in inst.modalities:
                if m not in self.model.encoders:
                    raise ConfigError(f"institutions[{i}].modalities", f"{m!r} has no encoder in model.encoders; known: {', '.join(self.model.encoders)}")
            for t in inst.tasks:
                if t not in self.model.tasks:
                    raise ConfigError(f"institutions[{i}].tasks", f"{t!r} is not in model.tasks; known: {', '.join(self.model.tasks)}")
        if self.evaluation.every < 1:
            raise ConfigError("evaluation.every", f"must be >= 1 (rounds between validation passes), got {self.evaluation.every}")
        if self.evaluation.val_samples is not None and self.evaluation.val_samples < 1:
            raise ConfigError("evaluation.val_samples", f"must be >= 1 or unset, got {self.evaluation.val_samples}")
        resolve_policies(self)  # profiles, budgets, cohorts vs federation size

    def aggregator_for(self, component: str) -> PluginConfig:
        group = component.split(".")[0]
        return self.aggregation.get(group, self.aggregation.get("default", PluginConfig("fedavg")))


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> FederationConfig:
    """A config from a TOML path, a dict, or (None) the embedded default federation."""
    if source is None:
        from ..defaults import default_config_dict

        data = default_config_dict()
    elif isinstance(source, dict):
        data = source
    else:
        data = load_toml(source)
    return from_dict(FederationConfig, apply_overrides(data, overrides or []))


def resolve_selection(cfg: FederationConfig, inst: InstitutionConfig, catalogue: Catalogue, registry: Registry | None = None) -> list[str]:
    """The experts an institution trains: explicit, or every expert whose tags match its
    modalities/tasks (untagged = general) and whose size and memory fit its budget."""
    index = next(i for i, x in enumerate(cfg.institutions) if x is inst)
    path = f"institutions[{index}].experts"
    by_name: dict[str, ExpertConfig] = {e.name: e for e in cfg.model.experts}
    have_m, have_t = set(inst.modalities), set(inst.tasks)

    def fits(e: ExpertConfig) -> tuple[bool, str]:
        spec = catalogue.get("expert", e.plugin)
        mods, tasks = expert_tags(e, spec)
        if mods and not mods & have_m:
            return False, f"expert {e.name!r} serves modalities {sorted(mods)} but {inst.name!r} has {sorted(have_m)}"
        if tasks and not tasks & have_t:
            return False, f"expert {e.name!r} serves tasks {sorted(tasks)} but {inst.name!r} has {sorted(have_t)}"
        return True, ""

    if inst.experts is not None:
        for name in inst.experts:
            if name not in by_name:
                raise ConfigError(path, f"unknown expert {name!r}; model experts: {', '.join(by_name)}")
            ok, why = fits(by_name[name])
            if not ok:
                raise ConfigError(path, why)
        chosen = list(inst.experts)
    else:
        specific: dict[str, list[str]] = {}  # tag -> experts serving that modality/task
        general: list[str] = []
        for e in cfg.model.experts:
            spec = catalogue.get("expert", e.plugin)
            if not fits(e)[0]:
                continue
            if inst.compute == "small" and spec.size != "small":
                continue
            entry = registry.find("expert", e.plugin) if registry else None
            if inst.memory_mb is not None and entry is not None and entry.min_memory_mb > inst.memory_mb:
                continue
            mods, tasks = expert_tags(e, spec)
            tags = sorted((mods & have_m) | (tasks & have_t))
            if tags:
                specific.setdefault(tags[0], []).append(e.name)
            else:
                general.append(e.name)
        # Round-robin over the institution's modalities/tasks and the general experts, so
        # each modality gets a specialist and the general (cross-modal) experts a seat
        # before anything gets a second one; the budget then cuts the tail.
        # Each institution starts its queues at its own offset, so institutions sharing a
        # modality spread over that modality's specialists instead of all taking the first.
        chosen = []
        queues = [q[index % len(q):] + q[: index % len(q)] for q in [*specific.values(), general]]
        while any(queues):
            for q in queues:
                if q:
                    chosen.append(q.pop(0))
        budget = inst.max_experts if inst.max_experts is not None else COMPUTE_EXPERT_BUDGET[inst.compute]
        if budget:
            chosen = chosen[:budget]
    if not chosen:
        raise ConfigError(path, f"no expert fits institution {inst.name!r} (modalities {inst.modalities}, tasks {inst.tasks}, compute {inst.compute})")
    return chosen

