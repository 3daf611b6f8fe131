"""Built-in backends: where institutions run."""

from m3tfed import hookimpl

from . import flower, simulation
from .flower import build_flower_backend
from .simulation import SimulationBackend

__all__ = ["SimulationBackend", "build_flower_backend"]


@hookimpl
def register_backends(register):
    for module in (simulation, flower):  # each spec sits beside its backend
        register(module.SPEC)


@hookimpl
def register_commands(register):
    # serve / join / certs: a federation on Flower (flwr is imported when one runs).
    from .flower.commands import COMMANDS, HELP

    for name, add_arguments, run in COMMANDS:
        register(name, HELP[name], add_arguments, run)
