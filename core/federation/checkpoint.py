"""Atomic checkpoints: tensors in safetensors, metadata in JSON, never half-written.

A checkpoint is a directory holding ``tensors.safetensors`` and ``meta.json``. The
directory is built under a temporary name (``.<name>.tmp-*``) in the same parent,
fsynced, then renamed into place, so a crash leaves either the previous checkpoint or
the new one under the final name, plus at worst a leftover temp directory that
:func:`latest_checkpoint` ignores. ``meta.json`` records the format version and the
sha256 and byte size of the tensors file, so truncation and bit rot are caught at load
time with a :class:`~m3tfed.CheckpointError` that says which file and what is wrong.

A run folder has one commit point per round: each institution's personal state for
round N is written first (``institutions/<name>/round_NNNN``, see :func:`personal_path`),
then the server checkpoint ``checkpoints/round_NNNN`` is renamed into place. That rename
commits the round; a kill before it leaves round N-1 whole (its personal snapshots are
only pruned once round N is committed). :func:`claim_run_dir` gives a new run folder its
identity and :func:`check_resumable` refuses a checkpoint from another run or config.

Not here: what goes into a checkpoint (components, aggregator state, the ledger of who
touched what); the round loop decides that. :func:`flatten_components` helps it put
nested component states into the one flat ``str -> Tensor`` map safetensors stores.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..errors import CheckpointError
from ..files import fsync_dir as _fsync_dir
from ..files import write_bytes_atomic, write_json_atomic  # noqa: F401  (checkpoint's callers write run files with them)

log = logging.getLogger("m3tfed.checkpoint")

FORMAT = "m3tfed-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"
SEP = "::"  # component / parameter separator in flattened keys
# In a run folder an institution was erased from on its request (unlearning.forget):
# what carried its influence is gone, so the run must not be resumed.
ERASED_FILE = "erased.json"

_ROUND = re.compile(r"round_(\d+)")
_REQUIRED = ("tensors_file", "tensors_sha256", "tensors_bytes", "meta")


# -- saving --------------------------------------------------------------------
def save_checkpoint(
    directory: Path | str, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any], private: bool = False
) -> Path:
    """Write ``directory/{tensors.safetensors, meta.json}`` atomically; return ``directory``.

    ``meta`` must be JSON-serialisable; it comes back unchanged from :func:`load_checkpoint`.
    Replacing an existing checkpoint moves it aside, renames the new one in, then deletes
    the old one; if the second rename fails the old one is put back. ``private``
    (personal parts on a node): the folder stays 0700 and its files 0600, so nobody
    else can read them at any moment.
    """
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(mode=0o700 if private else 0o777, parents=True, exist_ok=True)
    prepared = _prepare(tensors)
    try:
        json.dumps(meta)  # fail before touching the disk
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint {directory}: meta is not JSON-serialisable: {exc}") from exc

    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        if not private:
            os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a checkpoint is as readable as its run
        tensors_path = tmp / TENSORS_FILE
        safetensors.torch.save_file(prepared, str(tensors_path))
        if private:
            os.chmod(tensors_path, 0o600)
        _fsync_path(tensors_path)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tensors_file": TENSORS_FILE,
            "tensors_sha256": _sha256(tensors_path),
            "tensors_bytes": tensors_path.stat().st_size,
            "num_tensors": len(prepared),
            "meta": meta,
        }
        _write_synced(tmp / META_FILE, json.dumps(record, indent=2) + "\n")
        if private:
            os.chmod(tmp / META_FILE, 0o600)
        _fsync_dir(tmp)
        _swap_in(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return directory


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached; tensors sharing storage are copied (safetensors refuses
    aliases, and a checkpoint should not care how the caller's tensors were made)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(key, str):
            raise TypeError(f"checkpoint keys must be str, got {key!r}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def _swap_in(tmp: Path, directory: Path) -> None:
    if not os.path.lexists(directory):
        os.replace(tmp, directory)
        return
    aside = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(directory, aside)
    try:
        os.replace(tmp, directory)
    except BaseException:
        os.replace(aside, directory)  # put the previous checkpoint back
        raise
    shutil.rmtree(aside, ignore_errors=True)


# -- loading -------------------------------------------------------------------
def verify_checkpoint(directory: Path | str, check_hash: bool = True) -> dict[str, Any]:
    """Check ``meta.json`` and the tensors file's size (and sha256) without loading the
    tensors; return the parsed ``meta.json`` record. Raises :class:`CheckpointError`."""
    directory = Path(directory)

    def fail(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {directory}: {problem}")

    if not directory.is_dir():
        raise fail("missing (no such directory)")
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise fail(
            f"missing {META_FILE} (the save never finished, or this is not an m3tfed checkpoint)"
        )
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise fail(f"{META_FILE} is not valid JSON ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise fail(f'{META_FILE} is not an m3tfed checkpoint record (no "format": "{FORMAT}")')
    version = record.get("format_version")
    if version != FORMAT_VERSION:
        raise fail(
            f"unknown format version {version!r}; this m3tfed reads version {FORMAT_VERSION}"
            + (" (upgrade m3tfed)" if isinstance(version, int) and version > FORMAT_VERSION else "")
        )
    for field in _REQUIRED:
        if field not in record:
            raise fail(f"{META_FILE} lacks field {field!r}")
    if record["tensors_file"] != TENSORS_FILE:
        raise fail(
            f"{META_FILE} names tensors file {record['tensors_file']!r}, expected {TENSORS_FILE!r}"
        )
    if not isinstance(record["tensors_bytes"], int) or not isinstance(
        record["tensors_sha256"], str
    ):
        raise fail(f"{META_FILE} has a malformed tensors_bytes or tensors_sha256")
    tensors_path = directory / TENSORS_FILE
    if not tensors_path.is_file():
        raise fail(f"missing {tensors_path.name}")
    size, expected = tensors_path.stat().st_size, record["tensors_bytes"]
    if size < expected:
        raise fail(
            f"{tensors_path.name} is truncated: {size} bytes, {META_FILE} records {expected}"
        )
    if size != expected:
        raise fail(f"{tensors_path.name} is corrupt: {size} bytes, {META_FILE} records {expected}")
    if check_hash and _sha256(tensors_path) != record["tensors_sha256"]:
        raise fail(f"{tensors_path.name} is corrupt: its sha256 does not match {META_FILE}")
    return record


def load_checkpoint(
    directory: Path | str, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` from a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` naming the path when the checkpoint is missing,
    truncated, corrupt (hash mismatch or unparsable safetensors), has bad JSON or an
    unknown format version. ``verify=False`` skips the sha256 (size is still checked).
    """
    directory = Path(directory)
    record = verify_checkpoint(directory, check_hash=verify)
    tensors_path = directory / TENSORS_FILE
    try:
        tensors = safetensors.torch.load_file(str(tensors_path))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(
            f"checkpoint {directory}: {tensors_path.name} is corrupt: safetensors cannot parse it ({exc})"
        ) from None
    return tensors, record["meta"]


def checkpoint_path(run_dir: Path | str, round_index: int) -> Path:
    """Where round ``round_index``'s checkpoint lives: ``run_dir/checkpoints/round_NNNN``."""
    return Path(run_dir) / "checkpoints" / f"round_{round_index:04d}"


def round_checkpoints(run_dir: Path | str) -> list[Path]:
    """Every ``run_dir/checkpoints/round_NNNN`` folder, newest first (temp dirs excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    rounds = []
    for entry in root.iterdir():
        m = _ROUND.fullmatch(entry.name)
        if m and entry.is_dir():
            rounds.append((int(m[1]), entry))
    return [entry for _, entry in sorted(rounds, reverse=True)]


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The ``run_dir/checkpoints/round_NNNN`` with the highest N that verifies (size and
    sha256), or None. Temp directories and broken checkpoints are skipped (with a warning
    for the broken ones)."""
    for entry in round_checkpoints(run_dir):
        try:
            verify_checkpoint(entry)
        except CheckpointError as exc:
            log.warning("skipping broken checkpoint: %s", exc)
            continue
        return entry
    return None


# -- run folders: identity, resume checks, personal snapshots ---------------------------
RUN_FILE = "run.json"


def claim_run_dir(run_dir: Path | str, info: dict[str, Any]) -> str:
    """Make ``run_dir`` a new run's folder and return the run's id (recorded in
    ``run.json`` and in every checkpoint). A folder that already holds a run is refused:
    reusing a name must never mix two runs' checkpoints."""
    run_dir = Path(run_dir)
    if run_dir.exists() and any((run_dir / f).exists() for f in (RUN_FILE, "config.json", "checkpoints")):
        raise CheckpointError(
            f"{run_dir} already holds a run; choose another --name, continue it with `m3tfed resume {run_dir}`, or delete the folder"
        )
    run_id = uuid.uuid4().hex
    write_json_atomic(run_dir / RUN_FILE, {**info, "run_id": run_id})
    return run_id


def run_info(run_dir: Path | str) -> dict[str, Any]:
    """What :func:`claim_run_dir` recorded for the run in ``run_dir`` (id, data root,
    threads; empty for a folder without ``run.json``)."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_id_of(run_dir: Path | str) -> str | None:
    """The id :func:`claim_run_dir` gave the run in ``run_dir`` (None for older runs)."""
    return run_info(run_dir).get("run_id")


def check_resumable(run_dir: Path | str, meta: dict[str, Any], config: dict[str, Any]) -> None:
    """Refuse to resume from a checkpoint written by another run (a reused folder) or
    under another config (``config``: the run's config as plain values)."""
    where = f"checkpoint round {meta.get('round')} in {run_dir}"
    run_id = run_id_of(run_dir)
    if run_id is not None and meta.get("run_id") != run_id:
        raise CheckpointError(f"{where} belongs to another run (run id {meta.get('run_id')}, this folder's run is {run_id}); the folder was reused")
    saved = meta.get("config")
    config = json.loads(json.dumps(config))  # as it reads back from JSON
    if saved != config:
        differ = sorted(_differences(saved, config))
        raise CheckpointError(f"{where} was written under a different config; differing keys: {', '.join(differ[:8]) or '(whole config)'}")


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path or "<root>"]


def personal_path(run_dir: Path | str, institution: str, round_index: int) -> Path:
    """Where an institution's personal state after round ``round_index`` lives."""
    return Path(run_dir) / "institutions" / institution / f"round_{round_index:04d}"


def prune_personal(run_dir: Path | str, institution: str, keep_from: int) -> None:
    """Delete an institution's personal snapshots older than round ``keep_from``."""
    root = Path(run_dir) / "institutions" / institution
    for entry in root.iterdir() if root.is_dir() else ():
        m = _ROUND.fullmatch(entry.name)
        if m and int(m[1]) < keep_from:
            shutil.rmtree(entry, ignore_errors=True)


# -- nested component states -----------------------------------------------------
def flatten_components(
    components: Mapping[str, Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """``{"expert.a": {"w": t}}`` -> ``{"expert.a::w": t}``. Component names may not
    contain ``::``; a component with no tensors does not survive (record names in meta)."""
    flat: dict[str, torch.Tensor] = {}
    for component, state in components.items():
        if SEP in component:
            raise ValueError(
                f"component name {component!r} contains {SEP!r}, which flattening reserves"
            )
        for param, tensor in state.items():
            flat[f"{component}{SEP}{param}"] = tensor
    return flat


def join_owners(owners: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """``{"owner": {"component": {"param": t}}}`` -> ``{"owner::component::param": t}``
    (inverse of :func:`split_owners` followed by :func:`unflatten_components`)."""
    return {f"{owner}{SEP}{k}": v for owner, components in owners.items() for k, v in flatten_components(components).items()}


def split_owners(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"owner::component::param": t}`` -> ``{"owner": {"component::param": t}}`` (the
    files that hold several owners' components: a run's kept state, a tuning run's
    scored models)."""
    owners: dict[str, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        owner, _, rest = key.partition(SEP)
        owners.setdefault(owner, {})[rest] = v
    return owners


def unflatten_components(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`flatten_components` (splits each key at its first ``::``)."""
    components: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        component, sep, param = key.partition(SEP)
        if not sep or not component or not param:
            raise ValueError(f"key {key!r} is not 'component{SEP}parameter'")
        components.setdefault(component, {})[param] = tensor
    return components


# -- small file helpers ------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
