"""The federation config: model, rounds, strategies, data source and institutions.

Institutions choose experts by their modalities, tasks and compute budget
(:func:`resolve_selection`); the server and every backend use the same resolution, so
what an institution trains is decided in one place.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..config import apply_overrides, from_dict, load_toml, schema_markdown, setting
from ..errors import ConfigError, did_you_mean
from ..messages import COMPONENT_GROUPS, component_group
from ..model import ExpertConfig, ModelConfig, PluginConfig, expert_tags
from ..privacy.policy import PolicyConfig, resolve_policies
from ..registry import Registry
from ..specs import Catalogue
from ..threads import Threads

# Experts an institution trains by default, by compute tier (None = every matching one).
# Each expert costs download, upload, optimizer state and memory, whatever k is.
COMPUTE_EXPERT_BUDGET: dict[str, int | None] = {"small": 2, "base": 4, "large": None}


@dataclass
class DeepSpeedSettings:
    """Local training sharded over several processes with DeepSpeed ZeRO (see
    docs/deepspeed.md and :mod:`m3tfed.federation.zero`), for a backbone too large for
    one device. Only trainable components come back; the server sees no difference."""

    processes: int = setting(2, ge=1, doc="ranks on the institution's machine: one per GPU, or per few CPU cores")
    zero_stage: int = setting(3, ge=0, le=3, doc="3 partitions every parameter (the frozen backbone too); 1-2 only optimizer state / gradients")
    config: dict[str, Any] = setting(factory=dict, doc="merged over the generated DeepSpeed config (e.g. `zero_optimization.offload_param`)")

    def validate(self, path: str = "deepspeed") -> None:
        for key in ("optimizer", "scheduler"):  # m3tfed passes its own (federation.optimizer, lr)
            if key in self.config:
                raise ConfigError(f"{path}.config.{key}", "is set by m3tfed from federation.optimizer and federation.lr; remove it")
        for key in ("gradient_accumulation_steps", "train_batch_size"):  # a step is one micro-step per task
            if key in self.config:
                raise ConfigError(f"{path}.config.{key}", "is set by m3tfed (one micro-step per task, federation.batch_size over the ranks); remove it")
        zero = self.config.get("zero_optimization", {})
        if not isinstance(zero, dict):
            raise ConfigError(f"{path}.config.zero_optimization", f"expected a table, got {type(zero).__name__}")
        stage = zero.get("stage", self.zero_stage)
        if stage != self.zero_stage:
            raise ConfigError(f"{path}.config.zero_optimization.stage", f"{stage} contradicts zero_stage = {self.zero_stage}; set zero_stage only")


@dataclass
class InstitutionConfig:
    name: str = setting(identifier=True, doc="unique; names its folder `institutions/<name>/`")
    modalities: list[str] = setting(min_items=1, doc="each needs an encoder in `model.encoders`")
    tasks: list[str] = setting(min_items=1, doc="each must be in `model.tasks`")
    compute: Literal["small", "base", "large"] = setting("base", doc="small: only small (low-rank) experts, 2 of them; base: 4; large: every match")
    memory_mb: float | None = setting(None, gt=0, doc="experts whose `min_memory_mb` (from their spec) exceeds this are skipped")
    experts: list[str] | None = setting(None, doc="explicit choice of `model.experts` names; default: by tags and compute")
    max_experts: int | None = setting(None, ge=0, doc="how many experts it trains; default by compute; 0 = no limit")
    personal: list[str] = setting(factory=list, doc="components that never leave it: `router`, `trunk`, `encoder.<modality>`, `task.<task>`, `expert.<name>`")
    policy: PolicyConfig = setting(factory=PolicyConfig, doc="privacy: a regulation profile plus overrides (docs/privacy.md)")
    deepspeed: DeepSpeedSettings | None = setting(None, doc="train locally with DeepSpeed ZeRO over several processes; none = in this process")


@dataclass
class FederationSettings:
    fraction: float = setting(1.0, gt=0, le=1, doc="of institutions sampled per round")
    min_institutions: int = setting(2, ge=1, doc="a round needs at least this many successful institutions")
    max_retries: int = setting(1, ge=0, doc="a round with too few successes is retried this often")
    local_steps: int = setting(10, ge=1, doc="mini-batches per institution per round")
    local_epochs: float | None = setting(None, gt=0, doc="if set, overrides local_steps per institution (local_epochs · num_train / batch_size); refused when an institution is under DP or secure aggregation: the step count would reveal its num_train")
    batch_size: int = setting(32, ge=1)
    lr: float = setting(3e-3, gt=0, doc="local learning rate")
    weight_decay: float = setting(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = setting("adamw", doc="local optimizer")
    optimizer_state: Literal["fresh", "persist"] = setting("persist", doc="`persist`: each institution keeps its optimizer state (AdamW moments) between rounds, at the institution, never sent; `fresh`: a new optimizer every round")
    timeout_s: float = setting(120.0, gt=0, doc="per institution per round; past it the institution is stopped and dropped")
    weight_experts_by: Literal["tokens", "samples"] = setting("tokens", doc="an expert's update weighs by the tokens routed to it, or by samples")
    backend: PluginConfig = setting(factory=lambda: PluginConfig("simulation"), doc="where institutions run")
    pipeline: list[PluginConfig] = setting(factory=list, doc="update stages (plugins of kind `stage`), e.g. `clip`; privacy stages plug in here")
    personalize_steps: int = setting(20, ge=0, doc="local fine-tuning of router + heads for the `personalized` model")
    personal_model: Literal["none", "ditto"] = setting("none", doc="`ditto` (Li et al. 2021): each institution also trains a personal copy of its whole model, every round for the round's steps, on its loss + (personal_lambda/2)||v - w||^2 with w the model it received; the copy never leaves it, and it is validated and tested as `personal_serve` says. A second local training per round; not for institutions under sample-level DP-SGD (their model is DP-SGD's) or DeepSpeed. Not the default: little gain on the validation checks the choice does not flatter, worse on real-edu's and the default federation's test, the smallest institution most (docs/results.md, Learning quality 14)")
    personal_lambda: float = setting(0.1, ge=0, doc="Ditto's pull of the personal model toward the federation's (larger: closer to the shared model); 0: after it starts from the first model it receives, it trains on the institution's own data alone, never pulled toward the federation's")
    personal_serve: Literal["lower", "personal", "mix"] = setting("lower", doc="with `personal_model`: the model an institution is validated and tested with: `lower`, whichever of its personal model and the federation's has the lower validation loss (a choice on its own data); `personal`, always its personal model (Ditto as published); `mix`, the two models' outputs interpolated, w x federation's + (1 - w) x personal's (logits for classifiers, values for regression), with w in {0, 1/4, 1/2, 3/4, 1} of the lowest validation loss (the model interpolation of Mansour et al. 2020); routing reports are the federation model's. With `personal_lambda = 0` a federation's model mixed with one trained alone: lower mean held-out loss than the federation's alone on a split check of five federations (real-edu's: Learning quality 24), on the protocol's test level mean AUC and a lower worst institution where schools share a curriculum or half of one, the best mean and worst of all methods where they share a fifth (docs/results.md, Learning quality 23)")
    fairness_q: float = setting(0.0, ge=0, doc="q-FFL-style fairness: each update weighs by its institution's training loss to the power q (0 = off)")
    fairness_loss: Literal["raw", "relative"] = setting("raw", doc="the loss `fairness_q` weighs by: as reported, or relative to the institution's first reported loss (task scales cancel)")
    specialists: Literal["spread", "shared", "grouped"] = setting("grouped", doc="institutions sharing a modality or task: `grouped` gives institutions with the same modalities and tasks the same experts and spreads unlike ones over a tag's specialists (validation loss lower in 4 of 6 seed x federation runs where it differs from `spread`: docs/results.md, Learning quality 13); `spread` starts every institution at its own offset in that tag's specialists (every specialist gets trainers); `shared` gives all the same ones (each expert learns from more institutions; worse on the default federation: Learning quality 11)")
    threads: Threads = setting("auto", ge=0, doc="torch CPU threads per process (m3tfed.threads): \"auto\" = OMP_NUM_THREADS if set, else the cores idle at start; 0 = every usable core")


# The methods the tuning grid applies to (the deep ones; the classical learners choose
# their L2 strength on validation themselves). fed_moe runs at `federation.lr` and
# `federation.local_steps`, so it has no entry in `evaluation.tuned`.
TUNED_METHODS = ("fed_moe", "personalized", "local", "dense_fedavg", "fedprox", "fedavg_ft", "ditto", "centralized")


@dataclass
class GridPoint:
    """A method's learning rate and local steps (unset = the federation's)."""

    lr: float | None = setting(None, gt=0, doc="local learning rate; unset = `federation.lr`")
    local_steps: int | None = setting(None, ge=1, doc="mini-batches per institution per round; unset = `federation.local_steps`")


@dataclass
class TuningGrid:
    """The shared tuning grid: every deep method runs at every point on the first seed and
    keeps the point of its lowest validation loss (docs/results.md)."""

    lr: list[float] = setting(factory=list, doc="learning rates tried; empty = only `federation.lr`")
    local_steps: list[int] = setting(factory=list, doc="local steps tried; empty = only `federation.local_steps`")

    def validate(self, path: str = "evaluation.grid") -> None:
        for key, values in (("lr", self.lr), ("local_steps", self.local_steps)):
            if any(v <= 0 for v in values) or len(set(values)) != len(values):
                raise ConfigError(f"{path}.{key}", f"expected distinct positive values, got {values}")

    def is_set(self) -> bool:
        """Whether any value is to be tuned (else every method runs at the config's point)."""
        return bool(self.lr or self.local_steps)

    def points(self) -> list[GridPoint]:
        """Every point of the grid (one unset point when the grid is empty)."""
        return [GridPoint(lr, steps) for lr in self.lr or [None] for steps in self.local_steps or [None]]


@dataclass
class EvaluationSettings:
    # The compared methods (m3tfed.federation.baselines); `m3tfed run --protocol` runs them all.
    baselines: list[Literal["local", "dense_fedavg", "fedprox", "fedavg_ft", "ditto", "centralized", "classical_pooled", "classical_local"]] = setting(
        factory=lambda: ["local", "dense_fedavg", "classical_pooled"], doc="compared with the federation (m3tfed.federation.baselines)"
    )
    personalize: bool = setting(True, doc="also evaluate the personalized model")
    plots: bool = setting(True, doc="write PNG plots into the run folder")
    every: int = setting(1, ge=1, doc="rounds between validation passes (learning curves, early stopping); the last round is always evaluated")
    val_samples: int | None = setting(None, ge=1, doc="validation samples per institution per pass (unset = all)")
    keep: Literal["group", "each", "best", "last"] = setting(
        "group",
        doc="`group`: the institutions that serve the same tasks from the same modalities choose together: each is tested with the round where their mean validation loss is lowest (that round's shared state and its own personal parts; `local`, training alone, always chooses alone); `each`: every institution the round of its own lowest validation loss; `best`: the round with the lowest mean validation loss, for every institution; `last`: the last",
    )
    average: float = setting(
        0.5,
        ge=0,
        lt=1,
        doc="each evaluated round after the first also validates the trained state averaged over rounds (an exponential average with this weight on the past; training goes on from each round's own state): the server's shared state, with each institution's personal parts as they are (the server's round checkpoints carry it); `local`'s and Ditto's own models whole; the centralized bound's pooled model. An institution keeps the averaged state where its validation loss is lower (with `keep = \"group\"` by its group's mean; one choice for all by the mean with `best` and `last`; `local` always chooses per institution, as one training alone would; Ditto's personal models choose each their own); 0 = off",
    )
    workers: int = setting(1, ge=0, doc="runs (seeds, grid points) at once, each in a process of its own; 0 = every usable core")
    grid: TuningGrid = setting(factory=TuningGrid, doc="shared tuning grid of the deep methods, chosen on validation on the first seed; empty = no tuning")
    tuned: dict[str, GridPoint] = field(
        default_factory=dict, metadata={"doc": "method -> its learning rate and local steps (the grid's choice; fed_moe's is `federation.*`); unlisted = the federation's", "key": "method"}
    )

    def validate(self, path: str = "evaluation") -> None:
        for method in self.tuned:
            if method not in TUNED_METHODS or method == "fed_moe":
                why = "fed_moe runs at federation.lr and federation.local_steps: set those" if method == "fed_moe" else f"not a tuned method; allowed: {', '.join(TUNED_METHODS[1:])}"
                raise ConfigError(f"{path}.tuned.{method}", why)

    @property
    def per_institution(self) -> bool:
        """Whether each institution keeps a state of its own (``keep`` is ``group`` or
        ``each``), tested with its own kept round's shared state."""
        return self.keep in ("group", "each")

    def point(self, method: str) -> GridPoint:
        """The learning rate and local steps ``method`` runs with (unset = the federation's)."""
        return self.tuned.get(method, GridPoint())


@dataclass
class FederationConfig:
    name: str = setting("federation", identifier=True, doc="run name; the run folder is `runs/<name>-<time>` unless `--name` is given")
    seed: int = setting(0, ge=0)
    rounds: int = setting(10, ge=1)
    model: ModelConfig = setting(factory=ModelConfig)
    federation: FederationSettings = setting(factory=FederationSettings)
    aggregation: dict[str, PluginConfig] = field(
        default_factory=lambda: {"default": PluginConfig("fedavg")},
        metadata={"doc": "component group (`encoder`, `expert`, `router`, `trunk`, `task`) or `default` -> aggregator plugin", "key": "group"},
    )
    data: PluginConfig = setting(factory=lambda: PluginConfig("synthetic"), doc="data source plugin")
    institutions: list[InstitutionConfig] = setting(factory=list, min_items=1)
    evaluation: EvaluationSettings = setting(factory=EvaluationSettings)

    def validate(self, path: str = "") -> None:
        if self.rounds < 1:
            raise ConfigError("rounds", "must be >= 1")
        if not self.institutions:
            raise ConfigError("institutions", "at least one institution is required")
        if self.evaluation.grid.local_steps and self.federation.local_epochs is not None:
            raise ConfigError("evaluation.grid.local_steps", "federation.local_epochs is set, so local steps are no setting here; tune lr only or unset local_epochs")
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
        for j, e in enumerate(self.model.experts):
            for key, known in (("modalities", self.model.encoders), ("tasks", self.model.tasks)):
                for tag in getattr(e, key):
                    if tag not in known:
                        raise ConfigError(f"model.experts[{j}].{key}", f"{tag!r} is not in model.{'encoders' if key == 'modalities' else 'tasks'}; known: {', '.join(known)}")
        for i, inst in enumerate(self.institutions):
            for m in inst.modalities:
                if m not in self.model.encoders:
                    raise ConfigError(f"institutions[{i}].modalities", f"{m!r} has no encoder in model.encoders; known: {', '.join(self.model.encoders)}")
            for t in inst.tasks:
                if t not in self.model.tasks:
                    raise ConfigError(f"institutions[{i}].tasks", f"{t!r} is not in model.tasks; known: {', '.join(self.model.tasks)}")
            for e in inst.experts or []:
                if e not in self.model.expert_names:
                    raise ConfigError(f"institutions[{i}].experts", f"unknown expert {e!r}; model experts: {', '.join(self.model.expert_names)}")
            own = self.components(inst)
            for c in inst.personal:
                if c not in own:
                    raise ConfigError(f"institutions[{i}].personal", f"{c!r} names no component of {inst.name!r}{did_you_mean(c, sorted(own))}; its components: {', '.join(sorted(own))}")
            cohorts = inst.policy.min_cohort
            for key in cohorts if isinstance(cohorts, dict) else ():
                # groups and "default" are checked by PolicyConfig; one component must exist
                if "." in key and key not in self.components():
                    everything = self.components()
                    raise ConfigError(
                        f"institutions[{i}].policy.min_cohort.{key}",
                        f"{key!r} names no component of the model{did_you_mean(key, sorted(everything))}; components: {', '.join(sorted(everything))}",
                    )
        policies = resolve_policies(self)  # profiles, budgets, cohorts vs federation size
        for i, inst in enumerate(self.institutions):
            policy = policies.get(inst.name)
            if inst.deepspeed is not None and policy is not None and policy.dp == "sample":
                source = (
                    "policy.dp"
                    if inst.policy.dp is not None
                    else f"policy.profile ({inst.policy.profile!r})"
                )
                raise ConfigError(
                    f"institutions[{i}].deepspeed",
                    f"{inst.name!r} asks for sample-level DP-SGD (institutions[{i}].{source} gives dp = 'sample'), which clips each "
                    "sample's gradient in this process, while DeepSpeed ZeRO shards gradients over its ranks; remove "
                    "[institutions.deepspeed] or use update-level DP (dp = 'local' or 'central')",
                )
        private = [n for n, p in policies.items() if p.noisy or p.secure_aggregation]
        if self.federation.local_epochs is not None and private:
            raise ConfigError("federation.local_epochs", local_epochs_leak(private))

    def components(self, inst: InstitutionConfig | None = None) -> set[str]:
        """Every component name of the model, or those ``inst`` can hold (its modalities,
        its tasks, any expert: which experts it trains is resolved later)."""
        modalities = self.model.encoders if inst is None else inst.modalities
        tasks = self.model.tasks if inst is None else inst.tasks
        experts = self.model.expert_names
        return {"router", "trunk", *(f"encoder.{m}" for m in modalities), *(f"task.{t}" for t in tasks), *(f"expert.{e}" for e in experts)}

    def aggregator_for(self, component: str) -> PluginConfig:
        group = component_group(component)
        return self.aggregation.get(group, self.aggregation.get("default", PluginConfig("fedavg")))


def local_epochs_leak(names: list[str]) -> str:
    """Why ``federation.local_epochs`` is refused for institutions that withhold
    statistics (differential privacy or secure aggregation)."""
    return (
        f"{', '.join(map(repr, names))} withhold every statistic of their data (differential privacy or "
        "secure aggregation), but local_epochs makes each one's step count local_epochs * num_train / "
        "batch_size, and that count leaves in the clear (the steps the server asks for, the privacy "
        "ledger, the round's duration); set federation.local_steps instead"
    )


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


def as_written(saved: Any) -> Any:
    """A run folder's saved config as the version that wrote it meant it: a task saved
    without ``wide`` (before December 2026, when every config.json began to carry it)
    had no wide term, where an unset ``wide`` now takes the task plugin's default; a run
    saved without ``evaluation.average`` (before session 17) validated no averaged state."""
    if not isinstance(saved, dict):
        return saved
    evaluation = saved.get("evaluation")
    if isinstance(evaluation, dict) and "average" not in evaluation:
        saved = {**saved, "evaluation": {**evaluation, "average": 0.0}}
    tasks = saved.get("model", {}).get("tasks")
    if not isinstance(tasks, dict):
        return saved
    old = {t: {**tc, "wide": []} for t, tc in tasks.items() if isinstance(tc, dict) and "wide" not in tc}
    if not old:
        return saved
    return {**saved, "model": {**saved["model"], "tasks": {**tasks, **old}}}


def saved_config(run_dir: Path) -> dict[str, Any]:
    """The config a run folder was written with (``config.json``, :func:`as_written`)."""
    return as_written(json.loads((Path(run_dir) / "config.json").read_text()))


def load_saved_config(run_dir: Path) -> FederationConfig:
    """:func:`saved_config`, loaded."""
    return load_config(saved_config(run_dir))


# docs/federation.md carries the config table between these markers; a test checks it is
# current. Regenerate with: python -m m3tfed.federation.config docs/federation.md
TABLE_START, TABLE_END = "<!-- config-table:start -->", "<!-- config-table:end -->"


def config_table() -> str:
    """Every config key with its type, allowed range, default and meaning (Markdown)."""
    return schema_markdown(FederationConfig)


def with_config_table(doc: str) -> str:
    """``doc`` with the text between the table markers replaced by :func:`config_table`."""
    head, start, rest = doc.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError(f"the document lacks the markers {TABLE_START} ... {TABLE_END}")
    return f"{head}{start}\n{config_table()}{end}{tail}"


def resolve_selection(cfg: FederationConfig, inst: InstitutionConfig, catalogue: Catalogue, registry: Registry | None = None) -> list[str]:
    """The experts an institution trains: explicit, or every expert whose tags match its
    modalities/tasks (untagged = general) and whose size and memory fit its budget.
    Memory comes from the expert's spec; ``registry`` is accepted for callers that have one."""
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
            # the spec is the source of truth (registry.toml is generated from it), so the
            # memory filter holds whether or not a registry file could be read
            if inst.memory_mb is not None and spec.min_memory_mb > inst.memory_mb:
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
        # "spread": each institution starts its queues at its own offset, so institutions
        # sharing a modality spread over that modality's specialists instead of all taking
        # the first; "shared": all take the same, so each expert learns from all of them;
        # "grouped": an institution takes the offset of the first with its modalities and
        # tasks, so like institutions share and unlike ones spread.
        chosen = []
        mode = cfg.federation.specialists
        offset = index if mode == "spread" else 0 if mode == "shared" else next(
            i for i, x in enumerate(cfg.institutions) if set(x.modalities) == have_m and set(x.tasks) == have_t
        )
        queues = [q[offset % len(q):] + q[: offset % len(q)] for q in [*specific.values(), general]]
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



if __name__ == "__main__":  # rewrite the config table in the Markdown files given
    import sys

    for doc_path in map(Path, sys.argv[1:]):
        doc_path.write_text(with_config_table(doc_path.read_text()))
