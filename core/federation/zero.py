"""An institution's local training sharded over several processes with DeepSpeed ZeRO.

For an institution whose model (usually a frozen pretrained backbone) is too large for
one device: ``[institutions.deepspeed]`` in its config (:class:`DeepSpeedSettings`) makes
:class:`ShardedTrainer` its :class:`~m3tfed.interfaces.LocalTrainer` for a round's job
(:meth:`Institution.train`). :func:`fit_sharded`

1. writes a work folder: the model's current parameters (received components, personal
   ones and the frozen backbone) as a checkpoint, the training split, and ``spec.json``
   (model config, selection, plugin names, optimizer settings, the DeepSpeed config);
2. launches ``processes`` ranks of :mod:`m3tfed.federation.zero_worker` with torchrun
   (rank variables set, a free ``MASTER_PORT``, gloo on CPU), each rank building the
   model under ZeRO stage ``zero_stage`` and training the trainable parameters;
3. reads back the trainable components rank 0 gathered and loads them into the model,
   so ``Institution.train`` computes deltas, runs its update stages and keeps personal
   components exactly as for in-process training. The backbone never comes back.

A rank that fails, or ranks that run past the job's time limit, raise an error naming
the institution and the failing rank's log tail; the whole process group is killed.

DeepSpeed is imported by the ranks only: importing this module does not import it.
Not here: multi-node launches (one institution = one machine) or DP-SGD (Opacus does not
run under ZeRO; ``FederationConfig.validate`` refuses the combination).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import to_dict
from ..errors import InstitutionTimeout
from ..interfaces import LocalFit, LocalRun
from ..model import M3TModel, wide_modalities
from ..threads import env_threads
from .checkpoint import load_checkpoint, save_checkpoint, unflatten_components

if TYPE_CHECKING:  # annotations only: institution.py imports this module
    from .config import DeepSpeedSettings
    from .institution import Institution

LOG_TAIL_CHARS = 3000


class ShardedTrainingError(RuntimeError):
    """A DeepSpeed rank failed; the message names the institution and the rank's log tail."""


@dataclass
class ShardedFit:
    """What the ranks report: the mean loss over steps and ranks, tokens routed to each
    expert (summed over ranks), per-rank partition sizes and timings, and launch time."""

    loss: float
    losses: list[float]  # per step
    tokens: dict[str, int]
    ranks: list[dict[str, Any]]
    zero_stage: int
    seconds: float

    def report(self) -> dict[str, Any]:
        """For ``TrainResult.details["deepspeed"]``."""
        return {
            "zero_stage": self.zero_stage,
            "losses": self.losses,
            "ranks": self.ranks,
            "seconds": self.seconds,
        }


def deepspeed_config(settings: DeepSpeedSettings, batch_size: int, tasks: int = 1) -> dict[str, Any]:
    """The generated DeepSpeed config with ``settings.config`` merged over it. A step
    is one micro-step per task (``gradient_accumulation_steps = tasks``): ZeRO-3 reduces
    a MoE layer's gradients once per backward, and one forward per task before a single
    backward would run each layer, and queue its experts' gradients, once per task."""
    micro = max(1, -(-batch_size // settings.processes))
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.zero_stage == 3:
        # Partition every parameter, however small: the point is that no rank holds the
        # whole backbone. (DeepSpeed's default keeps parameters under 1e5 elements whole.)
        zero["stage3_param_persistence_threshold"] = 0
    generated = {
        "train_micro_batch_size_per_gpu": micro,
        "train_batch_size": micro * settings.processes * tasks,
        "gradient_accumulation_steps": tasks,
        # DeepSpeed clips the gradient norm at 1.0 by default; in-process training does
        # not clip (DP's clipping is an update stage's), so neither do the ranks.
        "gradient_clipping": 0.0,
        "zero_optimization": zero,
        # A plain torch optimizer: nothing to compile (DeepSpeed's CPUAdam builds a C++ op).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return merge(generated, settings.config)


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            merge(out[key], value)
            if isinstance(value, Mapping) and isinstance(out.get(key), dict)
            else value
        )
    return out


class ShardedTrainer:
    """Local training over DeepSpeed ZeRO ranks (:func:`fit_sharded`). A fresh optimizer
    every call; ``LocalRun.only`` is not supported (the ranks train every trainable
    parameter); FedProx anchors at ``LocalRun.anchor``."""

    name = "deepspeed"
    keeps_optimizer_state = False

    def fit(self, institution: Institution, model: M3TModel, run: LocalRun) -> LocalFit:
        if run.only is not None:
            raise ValueError(
                f"institution {institution.name!r}: DeepSpeed ranks train every trainable component; they cannot restrict training to some"
            )
        done = fit_sharded(institution, model, run)
        return LocalFit(done.loss, done.tokens, {"deepspeed": done.report()})


def fit_sharded(institution: Institution, model: M3TModel, run: LocalRun) -> ShardedFit:
    """Train ``model``'s trainable parameters in DeepSpeed ranks and load the result into it.

    ``model`` must already hold the job's components (``Institution.load``)."""
    settings = institution.config.deepspeed
    if settings is None:
        raise ValueError(
            f"institution {institution.name!r} has no [institutions.deepspeed] settings"
        )
    start = time.perf_counter()
    anchored = {}
    for comp, mu in run.proximal_mu.items():  # FedProx: anchor at the received values
        if mu > 0 and run.anchor and comp in run.anchor:
            anchored.update({name: mu for name in run.anchor[comp]})
    fed = institution.settings
    spec = {
        "institution": institution.name,
        "model": to_dict(model.config),
        # the model's own build order: token order (and so what top-k capacity drops in
        # training) follows the modules' order, so the ranks build it the same way
        **model.selection,
        "plugins": plugins_of(institution),
        "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
        "anchored": anchored,
        # its wide statistics (wide_scale = "local"), computed from its split in this process
        "wide_stats": {m: [mean.tolist(), scale.tolist()] for m, (mean, scale) in institution.wide_stats.items()},
        "steps": run.steps,
        "lr": run.lr,
        "seed": run.seed % (1 << 63),
        "settings": {
            "batch_size": fed.batch_size,
            "optimizer": fed.optimizer,
            "weight_decay": fed.weight_decay,
        },
        "backend": "nccl" if torch.cuda.is_available() else "gloo",
        "ds_config": deepspeed_config(settings, fed.batch_size, len(institution.config.tasks)),
    }
    with tempfile.TemporaryDirectory(prefix=f"m3tfed-zero-{institution.name}-") as tmp:
        folder = Path(tmp)
        (folder / "spec.json").write_text(json.dumps(spec, indent=2))
        torch.save(institution.data.train, folder / "data.pt")
        save_checkpoint(
            folder / "model",
            dict(model.named_parameters()),
            {"institution": institution.name},
        )
        launch(institution.name, folder, settings.processes, run.deadline)
        tensors, meta = load_checkpoint(folder / "result")
    states = unflatten_components(tensors)
    expected = set(model.component_names())
    if set(states) != expected:
        raise ShardedTrainingError(
            f"institution {institution.name!r}: the DeepSpeed ranks returned components {sorted(states)}, expected {sorted(expected)}"
        )
    for comp, state in states.items():
        model.load_component_state(comp, state)
    return ShardedFit(
        meta["loss"],
        meta["losses"],
        meta["tokens"],
        meta["ranks"],
        meta["zero_stage"],
        time.perf_counter() - start,
    )


def plugins_of(institution: Institution) -> list[tuple[str, str, str]]:
    """(kind, name, package) of every plugin the institution's model is built from, so the
    ranks (which discover plugins through entry points) can say which one they lack."""
    cfg, catalogue = institution.pool.config, institution.pool.catalogue
    named = [("router", cfg.router.plugin)]
    named += [("encoder", cfg.encoders[m].plugin) for m in institution.config.modalities]
    # a wide term reads an encoder's width even where the institution lacks the modality
    named += [("encoder", cfg.encoders[m].plugin) for t in institution.config.tasks for m in wide_modalities(cfg, t, catalogue)]
    named += [("task", cfg.tasks[t].plugin) for t in institution.config.tasks]
    by_name = {e.name: e for e in cfg.experts}
    named += [("expert", by_name[e].plugin) for e in institution.experts]
    return sorted({(kind, name, catalogue.get(kind, name).package or "") for kind, name in named})


def child_env() -> dict[str, str]:
    """The ranks' environment: DeepSpeed's CPU accelerator where there is no GPU, and its
    op build cache inside the virtual environment (ops compile once, minutes each)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = str(env_threads(env))
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(name: str, folder: Path, processes: int, deadline: float | None) -> None:
    """Run the ranks with torchrun; raise naming the failed rank, kill all on timeout."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", f"--nproc_per_node={processes}", "--max_restarts=0",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        "-m", "m3tfed.federation.zero_worker", str(folder),
    ]  # fmt: skip
    with open(folder / "launcher.log", "wb") as out:
        # A new session: the launcher and its ranks form one process group to kill.
        proc = subprocess.Popen(
            cmd, env=child_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise InstitutionTimeout(
                f"institution {name!r}: DeepSpeed ranks ran past the time limit; {log_tails(folder, processes)}"
            ) from None
    finally:
        if proc.poll() is None:  # torchrun waits for its ranks, so one that exited left none
            kill_group(proc)
    if code != 0 or not (folder / "result").is_dir():
        failed = [r for r in range(processes) if (folder / f"rank{r}.failed").exists()]
        ranks = failed or list(range(processes))
        raise ShardedTrainingError(
            f"institution {name!r}: DeepSpeed training failed (launcher exit {code}); {log_tails(folder, processes, ranks)}"
        )


def log_tails(folder: Path, processes: int, ranks: list[int] | None = None) -> str:
    parts = []
    for r in ranks if ranks is not None else range(processes):
        path = folder / f"rank{r}.failed"
        if not path.exists():
            path = folder / f"rank{r}.log"
        text = (
            path.read_text(errors="replace")
            if path.exists()
            else "(no output: the rank never started)"
        )
        parts.append(f"rank {r} stderr tail:\n{text[-LOG_TAIL_CHARS:]}")
    launcher = folder / "launcher.log"
    if launcher.exists() and not any((folder / f"rank{r}.log").exists() for r in range(processes)):
        parts.append(
            f"torchrun output tail:\n{launcher.read_text(errors='replace')[-LOG_TAIL_CHARS:]}"
        )
    return "\n".join(parts)


def process_tree(root: int) -> list[int]:
    """``root``'s descendants (children first-found order), read from /proc.

    torchrun starts each rank in a session of its own, so killing the launcher's process
    group misses the ranks: they must be found through their parent links, and found
    *before* the launcher dies, since orphans are re-parented and the link is lost."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[-1].split()  # the name may hold spaces and ")"
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _running(pid: int) -> bool:
    """Alive and not yet a zombie (a zombie holds no memory and runs nothing)."""
    try:
        stat = (Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(proc: subprocess.Popen, wait_s: float = 60.0) -> None:
    """SIGKILL the launcher and every process below it, and return once none runs.

    The launcher is stopped first so it can neither restart ranks nor reap them; the
    ranks (and their process groups) are killed and waited for until they are zombies,
    then the launcher's group is killed and reaped. Without /proc only the launcher's
    group is killed."""
    if Path("/proc/self/stat").exists():
        _signal(proc.pid, signal.SIGSTOP, group=True)
        tree: list[int] = []
        while new := [p for p in process_tree(proc.pid) if p not in tree]:
            for pid in new:  # freeze before looking again, so nothing forks past us
                _signal(pid, signal.SIGSTOP)
            tree += new
        for pid in tree:
            _signal(pid, signal.SIGKILL, group=True)  # a rank leads its own group
            _signal(pid, signal.SIGKILL)
        end = time.monotonic() + wait_s
        while any(_running(p) for p in tree) and time.monotonic() < end:
            time.sleep(0.01)  # SIGKILL cannot be ignored: this ends as soon as the kernel reaps
    _signal(proc.pid, signal.SIGKILL, group=True)
    proc.wait()
