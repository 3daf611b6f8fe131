"""The ``m3tfed`` command: ``run``, ``resume``, ``forget``, ``plugins``, plus the commands
plugins add through ``register_commands`` (the Flower backend's ``serve`` / ``join`` /
``certs``, docs/deployment.md). Core names no plugin here: it asks the catalogue."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import ConfigError, M3TError

log = logging.getLogger("m3tfed.cli")


GENERATE = "-"  # `m3tfed plugins --registry` with no file


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugin_manager import get_catalogue
    from .registry import compare, load_registry

    catalogue = get_catalogue()
    if args.registry == GENERATE:  # `--registry` alone: write the registry the specs make
        from .registry import generate

        sys.stdout.write(generate(catalogue))
        return 0
    registry = load_registry(args.registry)
    rows = compare(registry, catalogue)
    broken = [{"plugin": b.plugin, "package": b.package, "kind": b.kind, "error": b.error} for b in catalogue.broken]
    if args.check:
        from .testing import check_plugin

        for row in rows:
            if row["installed"]:
                try:
                    check_plugin(row["kind"], row["name"], catalogue=catalogue, data_root=args.data)
                    row["check"] = "passed"
                except ConfigError as exc:  # needs infrastructure or options to be built
                    row["check"] = f"skipped: {exc}"
                except Exception as exc:  # report every failing plugin, not just the first
                    row["check"] = f"failed: {exc}"
    # --check fails (exit 1) when any plugin is broken or fails its contract checks
    failed = args.check and (broken or any(str(row.get("check", "")).startswith("failed") for row in rows))
    if args.json:
        print(json.dumps({"registry": registry.source, "plugins": rows, "broken": broken}, indent=2, default=str))
        return 1 if failed else 0
    print(f"registry: {registry.source}")
    header = f"{'kind':<11}{'name':<22}{'package':<24}{'version':<9}{'status':<17}{'modalities/tasks'}"
    print(header)
    print("-" * len(header))
    for row in rows:
        meta = row["installed"] or row["registry"]
        tags = ",".join(meta.get("modalities") or []) + ("/" + ",".join(meta.get("tasks") or []) if meta.get("tasks") else "")
        if "modality" in meta and meta["modality"]:
            tags = meta["modality"]
        flag = row["status"] if row["status"] == "ok" else f"! {row['status']}"
        line = f"{row['kind']:<11}{row['name']:<22}{meta.get('package', ''):<24}{meta.get('version', ''):<9}{flag:<17}{tags or '(general)'}"
        if "check" in row:
            line += f"  [{row['check']}]"
        print(line)
    for b in catalogue.broken:
        print(f"BROKEN {b}")
    return 1 if failed else 0


def cmd_run(args: argparse.Namespace) -> int:
    from .federation.lifecycle import run_job, run_seeds

    overrides = list(args.set or [])
    seeds, workers = args.seeds, args.workers
    if args.protocol:  # the full evaluation protocol (docs/results.md)
        seeds = seeds or 3
        overrides = [*protocol_overrides(args.config, overrides), *overrides]
        workers = 0 if workers is None else workers  # every usable core
    if seeds or workers is not None or _has_grid(args.config, overrides):  # a grid is tuned by run_seeds
        run_seeds(args.config, overrides=overrides, seeds=seeds or 1, name=args.name, runs_dir=Path(args.runs_dir), data_root=args.data, workers=workers)
    else:
        run_job(args.config, overrides=overrides, name=args.name, runs_dir=Path(args.runs_dir), data_root=args.data)
    return 0


# What --protocol adds to a config (later --set overrides win): every baseline, and the
# shared tuning grid of protocol_overrides.
PROTOCOL_OVERRIDES = [
    'evaluation.baselines=["local", "dense_fedavg", "fedprox", "fedavg_ft", "ditto", "centralized", "classical_pooled", "classical_local"]',
    "evaluation.personalize=true",
]


def _has_grid(config: str | None, overrides: list[str]) -> bool:
    from .federation.config import load_config

    return load_config(config, overrides).evaluation.grid.is_set()


def protocol_overrides(config: str | None, overrides: list[str]) -> list[str]:
    """The protocol's overrides for this config: every baseline, and (unless the config
    or ``--set`` has a grid) a grid from the config's point up, for every deep method
    alike: learning rate x {1, 2} and, unless the config sets ``local_epochs``, local
    steps x {1, 2}. Until session 10 the steps were x {1/2, 1}: on the default federation
    every deep method chose the larger, its validation loss falling steeply from the
    smaller (docs/results.md, "Learning quality" 11). The larger steps double that
    point's training work."""
    from .federation.config import load_config

    cfg = load_config(config, overrides)
    if cfg.evaluation.grid.is_set():
        return PROTOCOL_OVERRIDES
    f = cfg.federation
    out = [*PROTOCOL_OVERRIDES, f"evaluation.grid.lr=[{f.lr!r}, {2 * f.lr!r}]"]
    if f.local_epochs is None:
        out.append(f"evaluation.grid.local_steps=[{f.local_steps}, {2 * f.local_steps}]")
    return out


def cmd_resume(args: argparse.Namespace) -> int:
    from .federation.lifecycle import resume_job

    resume_job(Path(args.run_dir))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from .federation.unlearning import forget

    rec = forget(Path(args.run_dir), args.institution, out_dir=args.out, scope=args.scope)
    print(f"forgot {rec['institution']}: rolled back {len(rec['rolled_back'])} component(s) to round {rec['rolled_back_to_round']}, "
          f"retrained rounds {rec['retrained_rounds'][0]}..{rec['retrained_rounds'][-1]}; new run folder {rec['run_dir']}")
    if "erased_from_source" in rec:  # its policy asks erasure on request: done, not left to the operator
        print(f"erased from {rec['source_run']} (forget_on_request): {', '.join(rec['erased_from_source']) or 'nothing left to erase'}")
    else:
        print(f"the original {rec['source_run']} still holds its influence: delete it to finish")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="m3tfed", description="Federated multi-modal mixture-of-experts for education.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a federation (default: the embedded synthetic one)")
    run.add_argument("config", nargs="?", default=None, help="TOML config (default: the embedded synthetic federation)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. --set rounds=20; an institution or expert by its name: --set institutions.rural_school.personal='[\"router\"]'")
    run.add_argument("--name", default=None, help="run name (default: config name + time)")
    run.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs/)")
    run.add_argument("--data", default=None, help="root folder for data sources that read files")
    run.add_argument("--seeds", type=int, default=None, metavar="N", help="run N seeds (seed, seed+1, ...); tables show mean and 95%% interval")
    run.add_argument("--protocol", action="store_true", help="the full evaluation protocol: 3 seeds (or --seeds), every baseline, the tuning grid")
    run.add_argument("--workers", type=int, default=None, metavar="N",
                     help="runs (seeds, grid points) at once, each in its own process (default 1; with --protocol every usable core; 0 = every usable core)")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue a stopped run from its last checkpoint")
    resume.add_argument("run_dir")
    resume.set_defaults(func=cmd_resume)

    forget = sub.add_parser("forget", help="forget an institution: roll back what it touched and retrain without it")
    forget.add_argument("run_dir")
    forget.add_argument("--institution", required=True, help="the institution to forget")
    forget.add_argument("--out", default=None, help="new run folder (default: RUN_DIR-without-INSTITUTION)")
    forget.add_argument("--scope", choices=("touched", "all"), default=None,
                        help="touched: roll back only the components it touched (default); all: retrain from the initial state, "
                             "exactly a run without it (the default, and the only scope, for a forget_on_request policy)")
    forget.set_defaults(func=cmd_forget)

    plugins = sub.add_parser("plugins", help="list installed plugins beside registry.toml")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.add_argument("--check", action="store_true", help="run m3tfed.testing's check on every installed plugin, of every kind")
    plugins.add_argument("--data", default=None, help="root folder the data sources read files from (with --check)")
    plugins.add_argument("--registry", nargs="?", const=GENERATE, default=None, metavar="FILE",
                         help="compare with this registry file (default: ./registry.toml or the packaged one); "
                         "without FILE: print the registry.toml the installed specs generate")
    plugins.set_defaults(func=cmd_plugins)
    add_plugin_commands(sub)
    return p


def add_plugin_commands(sub) -> None:
    """The subcommands installed plugins add (``register_commands``); one that would
    take a built-in command's name is skipped with a warning naming its package."""
    from .plugin_manager import get_catalogue

    for name, command in sorted(get_catalogue().commands.items()):
        if name in sub.choices:
            log.warning("command %r from %r ignored: m3tfed has a command of that name", name, command.package)
            continue
        parser = sub.add_parser(name, help=command.help)
        command.add_arguments(parser)
        parser.set_defaults(func=command.run)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except M3TError as exc:
        print(f"m3tfed: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
