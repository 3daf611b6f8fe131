"""Who each institution is on a Flower deployment: one key pair per institution, and the
federation's register of their public keys.

``m3tfed certs FOLDER --institution NAME`` makes (in the coordinator's certificate folder,
next to the CA) ``institutions/NAME/node.key`` (the institution's private key, OpenSSH
format, as ``flower-supernode --auth-supernode-private-key`` reads it) and ``node.pub``,
and records the public key in ``institutions.json`` under NAME. The SuperLink runs with
Flower's SuperNode authentication (``--enable-supernode-auth``): ``m3tfed serve``
registers every public key of the register with ``flwr supernode register`` and keeps
the node id Flower gives each one (``nodes.json``). A SuperNode whose key is not
registered cannot connect at all (Flower refuses it); a registered node is the
institution its key was registered for, whatever name it writes in its replies
(``FlowerBackend.discover`` refuses a node that says it is someone else).

Revoking (``m3tfed certs FOLDER --revoke NAME``) marks the key revoked in the register:
a coordinator started afterwards does not register it, and ``Deployment.revoke`` also
unregisters it from a running SuperLink, which then refuses the node's next request.

Key files are written private (0600, in 0700 folders) before any content is written.
Not here: TLS certificates (``deploy.make_certificates``), starting processes (``deploy``).
"""

from __future__ import annotations

import datetime
import hashlib
import re
from pathlib import Path
from typing import Any

from m3tfed.errors import ConfigError
from m3tfed.federation.checkpoint import write_bytes_atomic, write_json_atomic

REGISTER = "institutions.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def key_folder(certs: Path, name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            "institution",
            f"{name!r} is not a usable institution name for a key folder (letters, digits, _ . -)",
        )
    return Path(certs) / "institutions" / name


def load_register(certs: Path) -> dict[str, dict[str, Any]]:
    """``institution -> {public_key, fingerprint, added, revoked}`` (empty if none yet)."""
    import json

    path = Path(certs) / REGISTER
    return json.loads(path.read_text()) if path.exists() else {}


def fingerprint(public_key: str) -> str:
    """A short, stable name for an OpenSSH public key line (SHA-256 of its key blob)."""
    blob = public_key.split()[1]
    return "SHA256:" + hashlib.sha256(blob.encode()).hexdigest()[:32]


def add_institution(certs: Path, name: str, public_key: Path | None = None) -> dict[str, Any]:
    """Register ``name``: with the public key file an institution made itself
    (``public_key``, OpenSSH format, a NIST curve as Flower requires), or with a new key
    pair made here (``institutions/NAME/node.key`` to hand to the institution over a
    private channel). A name is bound to one key: registering a taken name is refused
    (revoke it first to give the institution a new key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    register = load_register(certs)
    if name in register and not register[name].get("revoked"):
        raise ConfigError(
            "institution",
            f"{name!r} already has a key in {Path(certs) / REGISTER} ({register[name]['fingerprint']}); revoke it first to give it a new one",
        )
    folder = key_folder(certs, name)
    if public_key is None:
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        write_bytes_atomic(folder / "node.key", private, private=True)
        line = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
    else:
        line = Path(public_key).read_text().strip()
        try:
            loaded = serialization.load_ssh_public_key(line.encode())
        except Exception as exc:
            raise ConfigError(
                "public-key", f"{public_key}: not an OpenSSH public key ({exc})"
            ) from exc
        if not isinstance(loaded, ec.EllipticCurvePublicKey):
            raise ConfigError(
                "public-key",
                f"{public_key}: Flower needs an EC key on a NIST curve (ssh-keygen -t ecdsa -b 384)",
            )
    if any(
        e["public_key"] == line and not e.get("revoked") for n, e in register.items() if n != name
    ):
        raise ConfigError(
            "public-key",
            "this key is already registered for another institution; one key names one institution",
        )
    write_bytes_atomic(folder / "node.pub", (line + "\n").encode())
    entry = {
        "public_key": line,
        "fingerprint": fingerprint(line),
        "added": datetime.datetime.now().isoformat(timespec="seconds"),
        "revoked": False,
    }
    register[name] = entry
    write_json_atomic(Path(certs) / REGISTER, register)
    return entry


def revoke_institution(certs: Path, name: str) -> dict[str, Any]:
    """Mark ``name``'s key revoked and delete its private key if it is still here."""
    register = load_register(certs)
    if name not in register:
        raise ConfigError(
            "institution",
            f"{name!r} is not in {Path(certs) / REGISTER} (registered: {sorted(register)})",
        )
    register[name].update(
        revoked=True, revoked_at=datetime.datetime.now().isoformat(timespec="seconds")
    )
    write_json_atomic(Path(certs) / REGISTER, register)
    (key_folder(certs, name) / "node.key").unlink(missing_ok=True)
    return register[name]


def active(certs: Path) -> dict[str, str]:
    """``institution -> public key line`` of every key not revoked."""
    return {n: e["public_key"] for n, e in load_register(certs).items() if not e.get("revoked")}
