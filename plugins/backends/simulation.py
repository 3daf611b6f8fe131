"""In-process simulation backend: every institution runs in this process, one at a time.

Deterministic under a seed (each job carries its own seed). It records a transcript of
what crossed the (simulated) wire, so tests and benchmarks can check exactly which
components left each institution and how many bytes moved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from m3tfed import BackendSpec
from m3tfed.errors import CheckpointError, ConfigError, ContractError
from m3tfed.federation.checkpoint import (
    flatten_components,
    load_checkpoint,
    personal_path,
    prune_personal,
    save_checkpoint,
    unflatten_components,
)
from m3tfed.federation.institution import Institution, InstitutionTimeout, TrainJob, TrainResult
from m3tfed.federation.server import Failure, tensor_bytes

log = logging.getLogger("m3tfed.simulation")


class SimulationBackend:
    def __init__(self, institutions: dict[str, Institution], record_transcript: bool = True):
        self.institutions = institutions
        self.record_transcript = record_transcript
        self.transcript: list[dict] = []
        self.errors_seen: set[str] = set()  # a traceback is logged once per distinct error

    # -- capabilities --------------------------------------------------------------
    def components_of(self, name: str) -> list[str]:
        return self.institutions[name].component_names()

    def personal_of(self, name: str) -> list[str]:
        return list(self.institutions[name].config.personal)

    def local_steps(self, name: str) -> int:
        return self.institutions[name].local_steps()

    def ask(self, name: str, kind: str, payload: dict) -> dict:
        """Deliver a non-training message (``Institution.handle``) and return the reply."""
        self._record(payload.get("round", 0), name, f"ask:{kind}", {})
        return self.institutions[name].handle(kind, payload)

    # -- a round ---------------------------------------------------------------------
    def train(self, jobs: list[TrainJob]) -> list[TrainResult | Failure]:
        results: list[TrainResult | Failure] = []
        for job in jobs:
            self._record(job.round, job.institution, "down", {c: s for c, s in job.components.items()})
            try:
                result = self.institutions[job.institution].train(job)
            except InstitutionTimeout as exc:
                results.append(Failure(job.institution, f"timed out: {exc}"))
                continue
            except (ConfigError, ContractError) as exc:  # the same on every attempt: reported once by the server
                results.append(Failure(job.institution, str(exc), permanent=True))
                continue
            except Exception as exc:  # an institution's crash must not end the round
                error = f"{type(exc).__name__}: {exc}"
                if error in self.errors_seen:
                    log.warning("institution %s failed: %s (traceback logged before)", job.institution, error)
                else:
                    self.errors_seen.add(error)
                    log.exception("institution %s failed", job.institution)
                results.append(Failure(job.institution, f"raised {type(exc).__name__}: {exc}"))
                continue
            self._record(job.round, job.institution, "up", {u.component: u.delta for u in result.updates})
            results.append(result)
        return results

    def _record(self, rnd: int, name: str, direction: str, state: dict) -> None:
        if self.record_transcript:
            self.transcript.append(
                {"round": rnd, "institution": name, "direction": direction, "components": sorted(state), "bytes": tensor_bytes(state)}
            )

    # -- personal state lives with each institution (its own folder) ------------------
    def save_personal(self, run_dir: Path, rnd: int) -> None:
        """Snapshot round ``rnd``'s personal state of every institution that keeps any,
        before the server commits the round (checkpoint.py); round ``rnd - 1``'s stays
        until then, so a kill in between resumes from it."""
        for name, inst in self.institutions.items():
            if inst.keeps_state:  # an empty snapshot too: "not started yet" is state
                save_checkpoint(personal_path(run_dir, name, rnd), flatten_components(inst.personal_state), {"institution": name, "round": rnd})
                prune_personal(run_dir, name, keep_from=rnd - 1)

    def load_personal(self, run_dir: Path, rnd: int) -> None:
        for name, inst in self.institutions.items():
            if not inst.keeps_state:
                continue
            folder = personal_path(run_dir, name, rnd)
            if not folder.exists():
                raise CheckpointError(
                    f"{folder}: institution {name!r}'s personal state for round {rnd} is missing; resuming without it would "
                    f"restart its personal components ({', '.join(inst.config.personal) or 'none'}) from the shared values and its optimizer afresh"
                )
            tensors, meta = load_checkpoint(folder)
            if meta.get("institution") != name or meta.get("round") != rnd:
                raise CheckpointError(f"{folder}: holds {meta.get('institution')!r}'s state of round {meta.get('round')}, expected {name!r}'s of round {rnd}")
            inst.personal_state = unflatten_components(tensors)


# Registered by the package (``register_backends``).
SPEC = BackendSpec(
    name="simulation",
    build=SimulationBackend,
    version="0.1.0",
    license="Apache-2.0",
    description="in-process simulation, deterministic under a seed (default)",
)
