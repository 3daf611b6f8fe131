"""Building a federation from a config: data, institutions with their selections, the
update pipeline's stages, the backend and the server; and the privacy ledger plumbing
that a built federation carries.

Not for: running rounds (:mod:`.lifecycle`), baselines (:mod:`.baselines`) or reporting
(:mod:`.report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, M3TError
from ..interfaces import UpdateStage, as_update_stage
from ..plugin_manager import get_catalogue
from ..privacy.dp import attach_privacy, restore_privacy
from ..privacy.ledger import PrivacyLedger
from ..privacy.policy import privacy_stages
from ..specs import SECURE_AGGREGATION, Catalogue, plugin_label
from .config import FederationConfig, local_epochs_leak, resolve_selection
from .institution import Institution, ModelPool, default_accelerator
from .server import Server


@dataclass
class Federation:
    """A built federation: its config, server, institutions and each one's experts."""

    config: FederationConfig
    server: Server
    institutions: dict[str, Institution]
    selections: dict[str, list[str]]


def build_federation(
    cfg: FederationConfig,
    catalogue: Catalogue | None = None,
    data_root: str | Path | None = None,
    run_dir: Path | None = None,
    data: dict[str, Any] | None = None,
) -> Federation:
    """Everything a run needs: data, institutions with their selections, backend, server.

    Selection (and its memory filter) reads the installed specs, the one source of
    plugin metadata: registry.toml is generated from them and not read here."""
    catalogue = catalogue or get_catalogue()
    check_plugins(cfg, catalogue)
    if data is None:
        data = load_data(cfg, catalogue, data_root)
    pool = ModelPool(cfg.model, catalogue, default_accelerator())
    # In-process, a stage on both sides (secagg) is one object serving institutions and server.
    inst_stages, server_stages = build_stages(cfg, catalogue)
    selections, institutions = {}, {}
    for inst in cfg.institutions:
        if inst.name not in data:
            raise ConfigError("data", f"the data source produced no data for institution {inst.name!r}")
        selections[inst.name] = resolve_selection(cfg, inst, catalogue)
        institutions[inst.name] = Institution(
            inst, data[inst.name], selections[inst.name], cfg.federation, pool, inst_stages, cfg.federation.weight_experts_by
        )
    attach_privacy(cfg, institutions)  # each institution enforces its own policy too
    backend_cfg = cfg.federation.backend
    backend = catalogue.build("backend", backend_cfg.plugin, "federation.backend.options", backend_cfg.options, institutions=institutions)
    server = Server(cfg, catalogue, backend, server_stages=server_stages, run_dir=run_dir)
    return Federation(cfg, server, institutions, selections)


def build_stages(cfg: FederationConfig, catalogue: Catalogue) -> tuple[list[Any], list[Any]]:
    """The update pipeline's (institution-side, server-side) stages: the configured ones
    plus the privacy stages the institutions' policies ask for (policy checks, DP, secagg).
    A process that holds only one side (a Flower node or coordinator) takes its half."""
    added = privacy_stages(cfg, catalogue)
    pipeline = [*cfg.federation.pipeline, *added]
    # where each stage's options come from: the pipeline, or the institutions' policies
    paths = [f"federation.pipeline[{i}].options" for i in range(len(cfg.federation.pipeline))]
    paths += [f"institutions[*].policy (the {pc.plugin!r} stage it adds)" for pc in added]
    specs = [catalogue.get("stage", pc.plugin) for pc in pipeline]
    stages = [as_update_stage(catalogue.build("stage", pc.plugin, path, pc.options), spec.order) for spec, pc, path in zip(specs, pipeline, paths)]
    masked = any(SECURE_AGGREGATION in spec.provides for spec in specs)
    if masked and cfg.federation.local_epochs is not None:  # a masking stage of federation.pipeline
        raise ConfigError(
            "federation.local_epochs", local_epochs_leak([i.name for i in cfg.institutions])
        )
    for stage in stages:  # the policy stage refuses a policy that needs it when none runs
        stage.secure_aggregation = masked
    return stages_for("institution", stages), stages_for("server", stages)


def build_institution(
    cfg: FederationConfig,
    name: str,
    catalogue: Catalogue | None = None,
    data_root: str | Path | None = None,
) -> Institution:
    """One institution alone, as its own machine builds it (a Flower SuperNode): its
    data, its selection, its model and its side of the update pipeline. The data source
    sees every institution's config, so partitioners split exactly as in a full run."""
    catalogue = catalogue or get_catalogue()
    inst = next((i for i in cfg.institutions if i.name == name), None)
    if inst is None:
        raise ConfigError("institutions", f"no institution named {name!r}; the config has {', '.join(i.name for i in cfg.institutions)}")
    check_plugins(cfg, catalogue)
    data = load_data(cfg, catalogue, data_root)
    if name not in data:
        raise ConfigError("data", f"the data source produced no data for institution {name!r}")
    inst_stages, _ = build_stages(cfg, catalogue)
    pool = ModelPool(cfg.model, catalogue, default_accelerator())
    selection = resolve_selection(cfg, inst, catalogue)
    institution = Institution(inst, data[name], selection, cfg.federation, pool, inst_stages, cfg.federation.weight_experts_by)
    attach_privacy(cfg, {name: institution})  # it enforces its own policy
    return institution


def load_data(cfg: FederationConfig, catalogue: Catalogue, data_root: str | Path | None = None) -> dict[str, Any]:
    """Every institution's data from the configured source. What the source raises comes
    out once as a ConfigError at ``data.options`` naming the plugin (an option it does not
    take already names ``data.options.<option>``)."""
    source = catalogue.build("data", cfg.data.plugin, "data.options", cfg.data.options)
    try:
        return source.load(cfg.institutions, cfg.seed, Path(data_root) if data_root else None)
    except M3TError:
        raise
    except Exception as exc:
        spec = catalogue.get("data", cfg.data.plugin)
        names = ", ".join(i.name for i in cfg.institutions)
        raise ConfigError("data.options", f"{plugin_label(spec)}: loading the data of {names} raised {type(exc).__name__}: {exc}") from exc


def privacy_ledger(fed: Federation | Server) -> PrivacyLedger | None:
    """The run's privacy ledger (kept by the server-side ``policy`` stage), if any."""
    server = fed.server if isinstance(fed, Federation) else fed
    return next((s.ledger for s in server.server_stages if isinstance(getattr(s, "ledger", None), PrivacyLedger)), None)


def restore_ledger(fed: Federation, ledger: PrivacyLedger | None) -> None:
    """Continue from a ledger read back from a run folder: the server's ``policy`` stage
    keeps filling it, and each institution's accountant resumes from its last row."""
    if adopt_ledger(fed.server, ledger):
        restore_privacy(ledger, fed.institutions)


def adopt_ledger(server: Server, ledger: PrivacyLedger | None) -> bool:
    """Give the server stage that keeps the run's ledger ``ledger`` to keep filling;
    False when there is no ledger or no stage keeps one. The accountants are the
    caller's to restore (in this process, or on a backend's nodes)."""
    if ledger is None or privacy_ledger(server) is None:
        return False
    for stage in server.server_stages:
        if isinstance(getattr(stage, "ledger", None), PrivacyLedger):
            stage.ledger = ledger
    return True


def stages_for(side: str, stages: list[UpdateStage]) -> list[UpdateStage]:
    """The stages that run on ``side``, lowest ``order`` first (ties keep pipeline order).
    A stage with ``side = "both"`` (secure aggregation: masking at the institution,
    unmasking at the server) runs on both sides, on the server at its ``server_order``."""
    picked = []
    for stage in stages:
        if stage.side in (side, "both"):
            order = stage.server_order if side == "server" else stage.order
            picked.append((order, len(picked), stage))
    return [stage for _, _, stage in sorted(picked, key=lambda p: p[:2])]


def check_plugins(cfg: FederationConfig, catalogue: Catalogue) -> None:
    """Unknown plugin names fail here, with the config path and the installed names."""
    checks = [("model.router.plugin", "router", cfg.model.router.plugin), ("data.plugin", "data", cfg.data.plugin)]
    checks += [(f"model.encoders.{m}.plugin", "encoder", pc.plugin) for m, pc in cfg.model.encoders.items()]
    checks += [(f"model.tasks.{t}.plugin", "task", pc.plugin) for t, pc in cfg.model.tasks.items()]
    checks += [(f"model.experts[{i}].plugin", "expert", e.plugin) for i, e in enumerate(cfg.model.experts)]
    checks += [(f"aggregation.{g}.plugin", "aggregator", pc.plugin) for g, pc in cfg.aggregation.items()]
    checks += [(f"federation.pipeline[{i}].plugin", "stage", pc.plugin) for i, pc in enumerate(cfg.federation.pipeline)]
    checks.append(("federation.backend.plugin", "backend", cfg.federation.backend.plugin))
    for path, kind, name in checks:
        if name not in catalogue.specs[kind]:
            raise ConfigError(path, f"no {kind} plugin named {name!r}; installed: {', '.join(catalogue.names(kind)) or 'none'}")
