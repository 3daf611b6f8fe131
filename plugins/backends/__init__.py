"""Built-in backends: where institutions run."""

from m3tfed import BackendSpec, hookimpl

from .simulation import SimulationBackend


def build_flower_backend(**options):
    """Flower is imported only when this backend is used."""
    from .flower.backend import FlowerBackend

    return FlowerBackend(**options)


@hookimpl
def register_backends(register):
    register(
        BackendSpec(
            name="simulation",
            build=SimulationBackend,
            version="0.1.0",
            license="Apache-2.0",
            description="in-process simulation, deterministic under a seed (default)",
        )
    )
    register(
        BackendSpec(
            name="flower",
            build=build_flower_backend,
            version="0.1.0",
            license="Apache-2.0",
            description="Flower 1.41 deployment: a ServerApp drives m3tfed rounds, one SuperNode per institution (m3tfed serve / join)",
        )
    )


@hookimpl
def register_commands(register):
    # serve / join / certs: a federation on Flower (flwr is imported when one runs).
    from .flower.commands import COMMANDS, HELP

    for name, add_arguments, run in COMMANDS:
        register(name, HELP[name], add_arguments, run)
