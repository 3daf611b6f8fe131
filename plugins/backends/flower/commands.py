"""The ``m3tfed serve``, ``join`` and ``certs`` commands: a federation on Flower
(docs/deployment.md), added to the command line through ``register_commands``.

Only the wiring lives here (arguments, messages, exit codes); the deployment itself is
:mod:`.deploy` and :mod:`.identity`, imported when a command runs so that ``m3tfed --help``
does not need Flower installed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = {
    "serve": "coordinate a federation on Flower: a SuperLink and m3tfed's ServerApp",
    "join": "join a Flower federation as one institution (a SuperNode)",
    "certs": "the federation's CA, SuperLink certificate and institution keys",
}


def serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="federation TOML config (the institutions listed join with `m3tfed join`)")
    parser.add_argument("--name", default="flower-run", help="run name: runs/<name>/ (default: flower-run)")
    parser.add_argument("--runs-dir", default="runs", help="where run folders go (default: runs/)")
    parser.add_argument("--resume", action="store_true", help="continue runs/<name>/ from its newest checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="SuperLink address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    parser.add_argument("--superlink", default=None, help="HOST:PORT of a SuperLink already running (then none is started)")
    parser.add_argument("--home", default=None, help="FLWR_HOME and logs of this deployment (default: runs/.flower/<name>)")
    parser.add_argument("--insecure", action="store_true", help="no TLS: local testing only")
    parser.add_argument("--certs", default=None, help="the folder `m3tfed certs` made: CA, SuperLink certificate and the institutions' registered keys")
    parser.add_argument("--expose-control-api", action="store_true", help="allow a --host other than loopback without Flower's user authentication (a network that is yours alone)")
    parser.add_argument("--ca", default=None, help="CA certificate (with --cert and --key; default: the CA in --home, made on first start)")
    parser.add_argument("--cert", default=None, help="SuperLink TLS certificate")
    parser.add_argument("--key", default=None, help="SuperLink TLS private key")
    parser.add_argument("--wait", type=float, default=600.0, help="seconds to wait for every institution to join")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds beyond federation.timeout_s a node gets to answer")


def join_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the federation's TOML config (this institution's entry names its data and policy)")
    parser.add_argument("--institution", required=True, help="which institution of the config this machine is")
    parser.add_argument("--superlink", required=True, help="the coordinator's SuperLink, HOST:PORT")
    parser.add_argument("--data", default=None, help="root folder for data sources that read files")
    parser.add_argument("--home", default=None, help="FLWR_HOME, logs and personal state (default: ~/.m3tfed/nodes/<institution>)")
    parser.add_argument("--ca", default=None, help="the federation's CA certificate (TLS)")
    parser.add_argument("--key", default=None, help="this institution's private key (node.key from `m3tfed certs`)")
    parser.add_argument("--retry-s", type=float, default=10.0, help="start the SuperNode again this long after it exits with an error (0: do not)")
    parser.add_argument("--insecure", action="store_true", help="no TLS: local testing only")


def certs_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="where ca.crt, ca.key, server.crt, server.key and institutions/ go (keep it private)")
    parser.add_argument("--host", action="append", default=None, help="SuperLink host name or IP (repeatable; default 127.0.0.1 and localhost); "
                       "with an existing CA, signs a new SuperLink certificate for these hosts")
    parser.add_argument("--institution", action="append", default=None, help="make and register a key pair for this institution (repeatable)")
    parser.add_argument("--public-key", action="append", default=None, metavar="NAME=FILE", help="register a public key an institution made itself")
    parser.add_argument("--revoke", action="append", default=None, metavar="NAME", help="revoke this institution's key")


def serve(args: argparse.Namespace) -> int:
    """The coordinator: a SuperLink (unless --superlink names a running one) and the m3tfed
    ServerApp run on it with ``flwr run``; stops what it started, also on Ctrl-C."""
    import ipaddress
    import os
    import signal

    from m3tfed.plugins.backends.flower.deploy import Certificates, Deployment
    from m3tfed.plugins.backends.flower.identity import active

    folder = Path(args.home or Path(args.runs_dir) / ".flower" / args.name)
    given = {"--ca": args.ca, "--cert": args.cert, "--key": args.key}
    if any(given.values()) and not all(given.values()):
        missing = " and ".join(k for k, v in given.items() if not v)
        print(f"m3tfed: error: --ca, --cert and --key go together (the CA nodes trust, the SuperLink's certificate and its key); "
              f"{missing} missing. Make them with `m3tfed certs`, or give none to use the CA in {folder / 'certificates'} (made on first start)", file=sys.stderr)
        return 2
    certs_dir = Path(args.certs) if args.certs else None
    certs = Certificates(Path(args.ca), Path(args.cert), Path(args.key)) if args.ca else None
    if certs_dir is not None:
        certs = Certificates(certs_dir / "ca.crt", certs_dir / "server.crt", certs_dir / "server.key")
    if certs is not None and args.insecure:
        print("m3tfed: error: --insecure turns TLS off; it cannot be combined with --certs or --ca/--cert/--key", file=sys.stderr)
        return 2
    for path in (certs.ca, certs.cert, certs.key) if certs else ():
        if not path.is_file():
            print(f"m3tfed: error: {path} does not exist", file=sys.stderr)
            return 2
    host, _, port = (args.superlink or f"{args.host}:{args.port}").rpartition(":")
    # Flower 1.41 serves its control API (start runs, register nodes) on the same port as
    # the nodes' Fleet API: on another address than loopback it needs user authentication
    if not args.superlink and not _loopback(host, ipaddress) and os.environ.get("FLWR_OIDC_ENABLED") != "1" and not args.expose_control_api:
        print(f"m3tfed: error: --host {host} would expose the SuperLink's control API (start runs, register nodes) to the network "
              "without user authentication. Keep --host 127.0.0.1 and forward only /v1/fleet/ to it, or turn on Flower's user "
              "authentication (FLWR_OIDC_ENABLED=1), or pass --expose-control-api if the network is yours alone (docs/deployment.md)", file=sys.stderr)
        return 2
    config = Path(args.config).resolve()
    identities = None
    if not args.insecure:
        identities = certs_dir or (folder / "certificates")
        from m3tfed.federation.config import load_config

        keyless = [i.name for i in load_config(config).institutions if i.name not in active(identities)]
        if keyless:
            print(f"m3tfed: error: no registered key for {', '.join(keyless)} in {identities / 'institutions.json'}: "
                  f"every institution connects with its own key; make them with `m3tfed certs {identities} "
                  + " ".join(f"--institution {n}" for n in keyless) + "`", file=sys.stderr)
            return 2
    else:
        print("m3tfed: warning: --insecure: no TLS and no SuperNode authentication; any machine that reaches the port can join", file=sys.stderr)
    run_dir = (Path(args.runs_dir) / args.name).resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop: stop what we started
    dep = Deployment(folder, insecure=args.insecure, certificates=certs, host=host, superlink_port=int(port),
                     identities=identities, roots=[run_dir, config, folder.resolve()])
    try:
        if args.superlink and identities is not None:
            dep.register_nodes()  # a SuperLink someone else started (with --enable-supernode-auth)
        if not args.superlink:
            dep.start_superlink()
            print(f"SuperLink on {dep.address} ({'insecure' if args.insecure else 'TLS, CA ' + str(dep.certificates.ca)}); "
                  f"institutions join with: m3tfed join CONFIG --institution NAME --key NAME/node.key --superlink {dep.address}", file=sys.stderr)
        done = dep.run(config, run_dir, resume=args.resume, wait_nodes_s=args.wait, reply_grace_s=args.grace)
        result = run_dir / "flower.json"
        if not result.exists():
            print(f"m3tfed: error: the run ended (flwr exit code {done.returncode}) without a result; logs in {folder / 'logs'}", file=sys.stderr)
            return 1
        print(result.read_text())
        return 0
    finally:
        dep.stop()


def _loopback(host: str, ipaddress) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def join(args: argparse.Namespace) -> int:
    """One institution: a SuperNode whose ClientApp builds only that institution."""
    import signal
    import time

    from m3tfed.plugins.backends.flower.deploy import Certificates, Deployment

    folder = Path(args.home or Path.home() / ".m3tfed" / "nodes" / args.institution)
    certs = Certificates(Path(args.ca), Path(), Path()) if args.ca else None
    if not args.insecure and certs is None:
        print("m3tfed: error: TLS needs the federation's CA certificate: --ca ca.crt (or --insecure for local tests)", file=sys.stderr)
        return 2
    if not args.insecure and not args.key:
        print(f"m3tfed: error: the federation knows {args.institution} by its key: --key node.key (made by `m3tfed certs FOLDER --institution {args.institution}`)", file=sys.stderr)
        return 2
    dep = Deployment(folder, insecure=args.insecure, certificates=certs, superlink_port=1)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            proc = dep.start_supernode(args.institution, Path(args.config), data_root=args.data, superlink=args.superlink,
                                       private_key=Path(args.key).resolve() if args.key else None)
            print(f"{args.institution}: SuperNode pid {proc.pid} -> {args.superlink}; logs in {folder / 'logs'}", file=sys.stderr)
            code = proc.wait()
            dep.stop()
            if code == 0 or args.retry_s <= 0:
                return code
            # Flower's SuperNode gives up when the SuperLink refuses to activate it: its key
            # not registered yet (the coordinator registers on start), or revoked
            print(f"{args.institution}: SuperNode exited with code {code} (see its log: a key not registered yet, or revoked?); "
                  f"trying again in {args.retry_s:.0f}s", file=sys.stderr)
            time.sleep(args.retry_s)
    finally:
        dep.stop()


def certs(args: argparse.Namespace) -> int:
    """The CA and SuperLink certificate (made once, the CA key kept private in FOLDER), a
    key pair per institution, a certificate for another host, and revocations."""
    from m3tfed.plugins.backends.flower.deploy import make_certificates, sign_server_certificate
    from m3tfed.plugins.backends.flower.identity import (
        add_institution,
        key_folder,
        revoke_institution,
    )

    folder = Path(args.folder)
    hosts = tuple(args.host or ("127.0.0.1", "localhost"))
    if not (folder / "ca.crt").exists():
        c = make_certificates(folder, hosts=hosts)
        print(f"CA {c.ca} (give to every institution and to flwr; ca.key stays here, private)\nserver certificate {c.cert}, key {c.key} (SuperLink only)")
    elif args.host:
        c = sign_server_certificate(folder, hosts)
        print(f"server certificate {c.cert}, key {c.key} for {', '.join(hosts)}, signed by the CA in {folder}")
    for name in args.institution or ():
        entry = add_institution(folder, name)
        print(f"{name}: key {entry['fingerprint']}; give {key_folder(folder, name) / 'node.key'} to {name} only (m3tfed join --key)")
    for pair in args.public_key or ():
        name, _, path = pair.partition("=")
        entry = add_institution(folder, name, public_key=Path(path))
        print(f"{name}: registered its own key {entry['fingerprint']}")
    for name in args.revoke or ():
        revoke_institution(folder, name)
        print(f"{name}: key revoked; a coordinator started from now on refuses it (a running one: restart it, or `flwr supernode unregister`)")
    return 0


COMMANDS = (
    ("serve", serve_arguments, serve),
    ("join", join_arguments, join),
    ("certs", certs_arguments, certs),
)
