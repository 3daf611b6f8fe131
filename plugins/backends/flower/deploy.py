"""Start and stop a Flower deployment of m3tfed on this machine: a SuperLink, SuperNodes
(one per institution), and ``flwr run`` of the m3tfed Flower App.

Operational hygiene, because Flower's own tools reuse whatever answers on their default
ports and leave servers running: every process started here gets ports picked free for
this deployment, its own ``FLWR_HOME`` under the deployment's folder, telemetry off and
runtime dependency installation off (no network). Each process starts in its own
process group (``start_new_session``), and :meth:`Deployment.stop` stops it by group:
SIGTERM, then SIGKILL, to every process group it and the helpers Flower spawned under
it (SuperExec, ServerApp and ClientApp processes) are in. A group id stays valid while
any member lives, so this also stops the helpers of a process that already died (a
crash, or :meth:`Deployment.kill`). TLS is on unless ``insecure=True``;
:func:`make_certificates` writes a local CA and a server certificate for
127.0.0.1/localhost, and a deployment folder that already holds them keeps them
(:func:`load_or_make_certificates`: a restarted coordinator keeps the CA its nodes trust).

Not here: what the apps do (``server_app.py``, ``client_app.py``).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("m3tfed.flower")
# The folders (os.pathsep-separated) the m3tfed ServerApp may take config and run paths
# from: set by `m3tfed serve` on the SuperLink, whose SuperExec starts the ServerApp.
ROOTS_ENV = "M3TFED_FLOWER_ROOTS"

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "m3tfed-flower"
version = "1.0.0"
description = "m3tfed rounds on Flower: the ServerApp drives m3tfed's round loop, the ClientApp wraps one institution"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "m3tfed"

[tool.flwr.app.components]
serverapp = "m3tfed.plugins.backends.flower.server_app:app"
clientapp = "m3tfed.plugins.backends.flower.client_app:app"

[tool.flwr.app.config]
config = ""          # the federation config file, on the coordinator's machine
run-dir = ""         # m3tfed's run folder (config, checkpoints, curves, flower.json)
resume = false       # continue from run-dir's newest checkpoint
stop-after = 0       # stop after this round (0: run every round of the config)
wait-nodes-s = 120.0 # how long to wait for every institution's SuperNode to connect
reply-grace-s = 30.0 # extra seconds a node gets beyond federation.timeout_s to answer
ask-timeout-s = 120.0 # seconds a node gets to answer any other message (secure aggregation, privacy reports)
nodes = ""           # nodes.json: institution -> the node id of its registered key (m3tfed serve writes it)
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_app(folder: Path) -> Path:
    """The Flower App folder ``flwr run`` packs: a pyproject.toml naming m3tfed's apps
    (the code comes from the installed m3tfed on each machine, not from the package)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder


def flower_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or "1",  # set but empty counts as unset
            # A SuperExec looks for work to launch (a ClientApp per message) every second
            # by default: up to 1 s more per message, and secure aggregation sends several
            # messages in a row per round. A local poll every 0.1 s costs nothing.
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": env.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1"),
        }
    )
    # Flower's entry points live beside this interpreter (a virtualenv need not be active).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def write_connection(home: Path, name: str, address: str, insecure: bool, root_cert: Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection (``flwr run APP name``)."""
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    if insecure:
        lines.append("insecure = true")
    elif root_cert is not None:
        lines.append(f'root-certificates = "{Path(root_cert).resolve()}"')
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Certificates:
    ca: Path
    cert: Path
    key: Path


def make_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> Certificates:
    """A CA and a server certificate (signed by it) for ``hosts``, PEM files in ``folder``:
    ``ca.crt`` goes to every SuperNode and ``flwr`` (``--root-certificates``), ``server.crt``
    and ``server.key`` to the SuperLink. ``ca.key`` stays in ``folder`` (0600, the folder
    0700): :func:`sign_server_certificate` signs a certificate for another host with it,
    so the institutions keep trusting the same ``ca.crt``. A folder that already holds a
    CA keeps it (only the server certificate is made anew)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from m3tfed.federation.checkpoint import write_bytes_atomic

    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not (folder / "ca.key").exists():
        now = datetime.datetime.now(datetime.timezone.utc)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "m3tfed federation CA")])
        ca = (
            x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        write_bytes_atomic(folder / "ca.key", ca_key.private_bytes(*pkcs8), private=True)
        write_bytes_atomic(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    return sign_server_certificate(folder, hosts, days)


def sign_server_certificate(folder: Path, hosts: tuple[str, ...], days: int = 365) -> Certificates:
    """A SuperLink certificate for ``hosts`` signed by the CA in ``folder`` (``ca.key``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from m3tfed.errors import ConfigError
    from m3tfed.federation.checkpoint import write_bytes_atomic

    folder = Path(folder)
    if not (folder / "ca.key").exists():
        raise ConfigError("certificates", f"{folder} holds no ca.key: only the folder `m3tfed certs` made can sign for its CA")
    ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    pkcs8 = (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_bytes_atomic(out.key, key.private_bytes(*pkcs8), private=True)  # 0600 before the key is in it
    write_bytes_atomic(out.cert, cert.public_bytes(serialization.Encoding.PEM))
    return out


def load_or_make_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Certificates:
    """The CA and SuperLink certificate already in ``folder``, else new ones. Reusing
    them matters: the nodes trust this CA, so a coordinator restarted in the same folder
    (``m3tfed serve --resume``) must not make another."""
    from cryptography import x509
    from m3tfed.errors import ConfigError

    out = Certificates(folder / "ca.crt", folder / "server.crt", folder / "server.key")
    if not out.ca.exists():
        return make_certificates(folder, hosts)
    if not (out.cert.exists() and out.key.exists()):
        raise ConfigError("certificates", f"{folder} holds ca.crt but not server.crt and server.key; restore them, or sign new ones with `m3tfed certs {folder} --host HOST`")
    cert = x509.load_pem_x509_certificate(out.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {*sans.get_values_for_type(x509.DNSName), *(str(a) for a in sans.get_values_for_type(x509.IPAddress))}
    if hosts[0] not in names:
        raise ConfigError("certificates", f"{out.cert} is for {sorted(names)}, not {hosts[0]}; sign one for this host with the same CA (m3tfed certs {folder} --host {hosts[0]})")
    log.info("reusing the CA and SuperLink certificate in %s", folder)
    return out


def node_config(config: Path, institution: str, state_dir: Path, data_root: str | Path | None = None) -> str:
    """The ``--node-config`` string naming what a SuperNode's ClientApp builds."""
    pairs = {"config": str(Path(config).resolve()), "institution": institution, "state-dir": str(Path(state_dir).resolve())}
    if data_root:
        pairs["data-root"] = str(Path(data_root).resolve())
    return " ".join(f"{k}={json.dumps(v)}" for k, v in pairs.items())


def _processes() -> dict[int, list[str]]:
    """pid -> the fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
    return out


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for child, fields in _processes().items():
        children.setdefault(int(fields[1]), []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def process_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` and of every process below it."""
    procs = _processes()
    return {int(procs[p][2]) for p in [pid, *descendants(pid)] if p in procs}


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count)."""
    return any(int(f[2]) == pgid and f[0] != "Z" for f in _processes().values())


def flower_group(pgid: int) -> bool:
    """Whether group ``pgid`` still holds a Flower process: a group id remembered for a
    while is signalled only then (once a group is empty, its id may be reused)."""
    for pid, fields in _processes().items():
        if int(fields[2]) == pgid:
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"flwr" in cmd or b"flower" in cmd:
                return True
    return False


def stop_groups(groups: set[int], grace: float = 5.0) -> None:
    """SIGTERM every process of ``groups``; SIGKILL what is left after ``grace`` seconds."""
    for pgid in groups:
        _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pgid in groups:
        if group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)


@dataclass
class Deployment:
    """Flower processes on this machine, with their own ports and home folder."""

    folder: Path
    insecure: bool = False
    certificates: Certificates | None = None
    host: str = "127.0.0.1"
    superlink_port: int = 0
    # the certificate folder whose institutions.json lists the institutions' public keys
    # (identity.py): the SuperLink then runs with SuperNode authentication and registers them
    identities: Path | None = None
    # the only folders (or files) the m3tfed ServerApp may read a config from or write a run to
    roots: list[Path] = field(default_factory=list)
    node_ids: dict[str, int] = field(default_factory=dict)  # institution -> its registered Flower node id
    # SuperNodes answer every message in one warm process (worker.py) instead of a fresh
    # ClientApp process per message (Flower's default, ``warm=False``)
    warm: bool = True
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    # process groups seen under each started process (Flower starts some helpers in new sessions)
    groups: dict[str, set[int]] = field(default_factory=dict)
    leftovers: set[int] = field(default_factory=set)  # process groups of processes killed as a crash
    workers: dict[str, str] = field(default_factory=dict)  # SuperNode process name -> its warm worker's

    def __post_init__(self) -> None:
        self.folder = Path(self.folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        # Flower's processes run in their own home folders: every path they get is absolute
        if self.certificates is not None:
            c = self.certificates
            self.certificates = Certificates(Path(c.ca).resolve(), Path(c.cert).resolve(), Path(c.key).resolve())
        if self.identities is not None:
            self.identities = Path(self.identities).resolve()
        if not self.insecure and self.certificates is None:
            self.certificates = load_or_make_certificates(self.folder / "certificates", hosts=(self.host, "localhost"))
        self.superlink_port = self.superlink_port or free_port(self.host)
        self.roots = [Path(r).resolve() for r in self.roots] or [self.folder]
        if self.identities is not None and self.insecure:
            from m3tfed.errors import ConfigError

            raise ConfigError("identities", "SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.superlink_port}"

    def _tls(self, server: bool) -> list[str]:
        if self.insecure:
            return ["--insecure"]
        c = self.certificates
        if server:
            return ["--ssl-ca-certfile", str(c.ca), "--ssl-certfile", str(c.cert), "--ssl-keyfile", str(c.key)]
        return ["--root-certificates", str(c.ca)]

    def _start(self, name: str, argv: list[str], home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        if name in self.processes and self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is already running (pid {self.processes[name].pid})")
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        out = open(logs / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, env={**flower_env(home), **(env or {})}, stdout=out, stderr=subprocess.STDOUT, cwd=home, start_new_session=True)
        out.close()
        self.processes[name], self.groups[name] = proc, {proc.pid}  # its own group: pgid = pid
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def start_superlink(self) -> subprocess.Popen:
        home = self.folder / "superlink"
        home.mkdir(exist_ok=True)
        argv = ["flower-superlink", *self._tls(True), "--host", self.host, "--port", str(self.superlink_port), "--disable-runtime-dependency-installation"]
        if self.identities is not None:
            argv.append("--enable-supernode-auth")  # only registered keys connect
        # the ServerApp (started by the SuperLink's SuperExec) inherits this environment
        proc = self._start("superlink", argv, home, env={ROOTS_ENV: os.pathsep.join(str(r) for r in self.roots)})
        self.wait_for_port(self.superlink_port, proc, "superlink")
        self.groups["superlink"] |= process_groups(proc.pid)  # its SuperExec runs in a session of its own
        if self.identities is not None:
            self.register_nodes()
        return proc

    # -- who may connect ----------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """A ``flwr`` command against this deployment's SuperLink (its control API);
        returns stdout, raises with Flower's output when it fails."""
        home = self.folder / "flwr-cli"
        write_connection(home, "m3tfed", self.address, self.insecure, self.certificates.ca if self.certificates else None)
        done = subprocess.run(["flwr", *args], env=flower_env(home), cwd=home, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}): {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return done.stdout

    def register_nodes(self) -> dict[str, int]:
        """Register every key of the identity register not revoked with the SuperLink
        (``flwr supernode register``); write ``nodes.json``, institution -> node id, that
        the ServerApp binds each node to its institution with."""
        from .identity import active, key_folder

        for name in active(self.identities):
            if name in self.node_ids:
                continue
            out = self.flwr("supernode", "register", str(key_folder(self.identities, name) / "node.pub"), "m3tfed", "--format", "json")
            reply = json.loads(out[out.index("{"):])
            self.node_ids[name] = int(reply["node-id"])
            log.info("registered %s's key: node %d", name, self.node_ids[name])
        self._write_node_ids()
        return self.node_ids

    def revoke(self, institution: str) -> None:
        """Revoke ``institution``'s key in the register and unregister its node from the
        running SuperLink: its SuperNode's next request is refused, now and after restarts."""
        from .identity import revoke_institution

        revoke_institution(self.identities, institution)
        node = self.node_ids.pop(institution, None)
        if node is not None and "superlink" in self.processes:
            self.flwr("supernode", "unregister", str(node), "m3tfed")
            log.warning("revoked %s: node %d unregistered from the SuperLink", institution, node)
        self._write_node_ids()

    def _write_node_ids(self) -> None:
        from m3tfed.federation.checkpoint import write_json_atomic

        write_json_atomic(self.nodes_file, self.node_ids, private=True)

    @property
    def nodes_file(self) -> Path:
        return self.folder / "nodes.json"

    def start_supernode(
        self,
        institution: str,
        config: Path,
        data_root: str | Path | None = None,
        superlink: str | None = None,
        private_key: Path | None = None,
        name: str | None = None,
    ) -> subprocess.Popen:
        """A SuperNode for ``institution``, authenticating with ``private_key`` (default:
        the institution's key in ``identities``, when there is one). ``name``: the
        process's name here (default ``supernode-<institution>``)."""
        name = name or f"supernode-{institution}"
        home = self.folder / "nodes" / name.removeprefix("supernode-")
        home.mkdir(mode=0o700, parents=True, exist_ok=True)  # its state holds personal parts and secrets
        os.chmod(home, 0o700)
        if private_key is None and self.identities is not None:
            from .identity import key_folder

            private_key = key_folder(self.identities, institution) / "node.key"
        argv = [
            "flower-supernode", *self._tls(False), "--superlink", superlink or self.address,
            "--host", self.host, "--port", str(free_port(self.host)),
            "--node-config", node_config(config, institution, home / "state", data_root),
        ]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if not self.warm:
            return self._start(name, argv, home)
        runtime_port = int(argv[argv.index("--port") + 1])
        proc = self._start(name, [*argv, "--isolation", "process"], home)
        worker = [sys.executable, "-m", "m3tfed.plugins.backends.flower.worker", "--runtime-api-address", f"{self.host}:{runtime_port}",
                  "--insecure", "--parent-pid", str(proc.pid)]  # the node's Runtime API: loopback, this machine only
        self._start(f"{name}-worker", worker, home)
        self.workers[name] = f"{name}-worker"
        return proc

    def wait_for_port(self, port: int, proc: subprocess.Popen, name: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}; see {self.folder / 'logs' / (name + '.log')}")
            with socket.socket() as s:
                if s.connect_ex((self.host, port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not listen on {self.host}:{port} within {timeout}s")

    def run(self, config: Path, run_dir: Path, timeout: float | None = None, app: Path | None = None, **run_config: Any) -> subprocess.CompletedProcess:
        """``flwr run`` the m3tfed app (or another ``app`` folder) on this deployment's
        SuperLink and wait for it (``--stream`` follows the run to its end)."""
        home = self.folder / "flwr-cli"
        write_connection(home, "m3tfed", self.address, self.insecure, self.certificates.ca if self.certificates else None)
        app = app or write_app(self.folder / "app" / "m3tfed-flower")
        values = {"config": str(Path(config).resolve()), "run-dir": str(Path(run_dir).resolve()), **{k.replace("_", "-"): v for k, v in run_config.items()}}
        if self.identities is not None:
            values["nodes"] = str(self.nodes_file)
        overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
        argv = ["flwr", "run", str(app), "m3tfed", "--stream", "--run-config", overrides]
        logs = self.folder / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / "flwr-run.log", "ab") as out:
            proc = subprocess.Popen(argv, env=flower_env(home), stdout=out, stderr=subprocess.STDOUT, cwd=home, start_new_session=True)
            self.processes[f"flwr-run-{proc.pid}"], self.groups[f"flwr-run-{proc.pid}"] = proc, {proc.pid}
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.stop_process(f"flwr-run-{proc.pid}")
                raise
        return subprocess.CompletedProcess(argv, proc.returncode)

    def stop_process(self, name: str, grace: float = 5.0) -> None:
        """Stop one started process and everything it spawned, by process group."""
        proc = self.processes.pop(name, None)
        if proc is None:
            return
        # proc.pid is its own group (start_new_session); the id is ours until proc is reaped
        own = {proc.pid} | process_groups(proc.pid) if proc.returncode is None else set()
        remembered = {g for g in self.groups.pop(name, set()) | {proc.pid} if flower_group(g)}
        stop_groups(own | remembered, grace)
        proc.wait(timeout=grace)  # reaped: no zombie left behind

    def kill(self, name: str) -> None:
        """SIGKILL one process as a crash would; its helpers (in its process group, or in
        groups seen under it) are left running until :meth:`stop`. A SuperNode's warm
        worker dies with it, as on a crashed machine."""
        if name in self.workers:
            self.kill(self.workers.pop(name))
        proc = self.processes.pop(name)
        self.leftovers |= self.groups.pop(name, set()) | process_groups(proc.pid)
        proc.kill()
        proc.wait()

    def stop(self, grace: float = 5.0) -> None:
        """Stop everything this deployment started, all process groups at once (one grace
        period in all, not one per process)."""
        procs = {name: self.processes.pop(name) for name in list(self.processes)}
        groups = {g for g in self.leftovers if flower_group(g)}
        for name, proc in procs.items():
            own = {proc.pid} | process_groups(proc.pid) if proc.poll() is None else set()
            groups |= own | {g for g in self.groups.pop(name, set()) | {proc.pid} if flower_group(g)}
        stop_groups(groups, grace)
        for proc in procs.values():
            proc.wait(timeout=grace)  # reaped: no zombie left behind
        self.leftovers = set()

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # gone (or its id now names another user's group)
        pass
