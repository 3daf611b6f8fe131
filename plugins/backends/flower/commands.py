"""The ``m3tfed serve``, ``join`` and ``certs`` commands: a federation on Flower
(docs/deployment.md), added to the command line through ``register_commands``.

Only the wiring lives here (arguments, messages, exit codes); the deployment itself is
:mod:`.deploy`, imported when a command runs so that ``m3tfed --help`` does not need
Flower installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = {
    "serve": "coordinate a federation on Flower: a SuperLink and m3tfed's ServerApp",
    "join": "join a Flower federation as one institution (a SuperNode)",
    "certs": "make a CA and a SuperLink certificate for TLS",
}


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config", help="federation TOML config (the institutions listed join with `m3tfed join`)"
    )
    parser.add_argument(
        "--name", default="flower-run", help="run name: runs/<name>/ (default: flower-run)"
    )
    parser.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs/)")
    parser.add_argument(
        "--resume", action="store_true", help="continue runs/<name>/ from its newest checkpoint"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="SuperLink address to listen on (default: 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    parser.add_argument(
        "--superlink",
        default=None,
        help="HOST:PORT of a SuperLink already running (then none is started)",
    )
    parser.add_argument(
        "--home",
        default=None,
        help="FLWR_HOME and logs of this deployment (default: runs/.flower/<name>)",
    )
    parser.add_argument("--insecure", action="store_true", help="no TLS: local testing only")
    parser.add_argument(
        "--ca",
        default=None,
        help="CA certificate (with --cert and --key; default: the CA in --home, made on first start)",
    )
    parser.add_argument("--cert", default=None, help="SuperLink TLS certificate")
    parser.add_argument("--key", default=None, help="SuperLink TLS private key")
    parser.add_argument(
        "--wait", type=float, default=600.0, help="seconds to wait for every institution to join"
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds beyond federation.timeout_s a node gets to answer",
    )


def join_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        help="the federation's TOML config (this institution's entry names its data and policy)",
    )
    parser.add_argument(
        "--institution", required=True, help="which institution of the config this machine is"
    )
    parser.add_argument("--superlink", required=True, help="the coordinator's SuperLink, HOST:PORT")
    parser.add_argument("--data", default=None, help="root folder for data sources that read files")
    parser.add_argument(
        "--home",
        default=None,
        help="FLWR_HOME, logs and personal state (default: ~/.m3tfed/nodes/<institution>)",
    )
    parser.add_argument("--ca", default=None, help="the federation's CA certificate (TLS)")
    parser.add_argument("--insecure", action="store_true", help="no TLS: local testing only")


def certs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="where ca.crt, server.crt and server.key go")
    parser.add_argument(
        "--host",
        action="append",
        default=None,
        help="SuperLink host name or IP (repeatable; default 127.0.0.1 and localhost)",
    )


def serve(args: argparse.Namespace) -> int:
    """The coordinator: a SuperLink (unless --superlink names a running one) and the m3tfed
    ServerApp run on it with ``flwr run``; stops what it started, also on Ctrl-C."""
    from .deploy import Certificates, Deployment

    folder = Path(args.home or Path(args.runs_dir) / ".flower" / args.name)
    given = {"--ca": args.ca, "--cert": args.cert, "--key": args.key}
    if any(given.values()) and not all(given.values()):
        missing = " and ".join(k for k, v in given.items() if not v)
        print(
            f"m3tfed: error: --ca, --cert and --key go together (the CA nodes trust, the SuperLink's certificate and its key); "
            f"{missing} missing. Make them with `m3tfed certs`, or give none to use the CA in {folder / 'certificates'} (made on first start)",
            file=sys.stderr,
        )
        return 2
    certs = Certificates(Path(args.ca), Path(args.cert), Path(args.key)) if args.ca else None
    if certs is not None and args.insecure:
        print(
            "m3tfed: error: --insecure turns TLS off; it cannot be combined with --ca/--cert/--key",
            file=sys.stderr,
        )
        return 2
    for path in (certs.ca, certs.cert, certs.key) if certs else ():
        if not path.is_file():
            print(f"m3tfed: error: {path} does not exist", file=sys.stderr)
            return 2
    host, _, port = (args.superlink or f"{args.host}:{args.port}").rpartition(":")
    dep = Deployment(
        folder, insecure=args.insecure, certificates=certs, host=host, superlink_port=int(port)
    )
    try:
        if not args.superlink:
            dep.start_superlink()
            print(
                f"SuperLink on {dep.address} ({'insecure' if args.insecure else 'TLS, CA ' + str(dep.certificates.ca)}); "
                f"institutions join with: m3tfed join CONFIG --institution NAME --superlink {dep.address}",
                file=sys.stderr,
            )
        run_dir = Path(args.runs_dir) / args.name
        done = dep.run(
            Path(args.config),
            run_dir,
            resume=args.resume,
            wait_nodes_s=args.wait,
            reply_grace_s=args.grace,
        )
        result = run_dir / "flower.json"
        if not result.exists():
            print(
                f"m3tfed: error: the run ended (flwr exit code {done.returncode}) without a result; logs in {folder / 'logs'}",
                file=sys.stderr,
            )
            return 1
        print(result.read_text())
        return 0
    finally:
        dep.stop()


def join(args: argparse.Namespace) -> int:
    """One institution: a SuperNode whose ClientApp builds only that institution."""
    import signal

    from .deploy import Certificates, Deployment

    folder = Path(args.home or Path.home() / ".m3tfed" / "nodes" / args.institution)
    certs = Certificates(Path(args.ca), Path(), Path()) if args.ca else None
    if not args.insecure and certs is None:
        print(
            "m3tfed: error: TLS needs the federation's CA certificate: --ca ca.crt (or --insecure for local tests)",
            file=sys.stderr,
        )
        return 2
    dep = Deployment(folder, insecure=args.insecure, certificates=certs, superlink_port=1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        proc = dep.start_supernode(
            args.institution, Path(args.config), data_root=args.data, superlink=args.superlink
        )
        print(
            f"{args.institution}: SuperNode pid {proc.pid} -> {args.superlink}; logs in {folder / 'logs'}",
            file=sys.stderr,
        )
        return proc.wait()
    finally:
        dep.stop()


def certs(args: argparse.Namespace) -> int:
    from .deploy import make_certificates

    c = make_certificates(Path(args.folder), hosts=tuple(args.host or ("127.0.0.1", "localhost")))
    print(
        f"CA {c.ca} (give to every institution and to flwr)\nserver certificate {c.cert}, key {c.key} (SuperLink only)"
    )
    return 0


COMMANDS = (
    ("serve", serve_arguments, serve),
    ("join", join_arguments, join),
    ("certs", certs_arguments, certs),
)
