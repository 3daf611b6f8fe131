"""The Flower backend: a ServerApp that drives m3tfed rounds and a ClientApp per institution."""

from m3tfed import BackendSpec


def build_flower_backend(**options):
    """Flower is imported only when this backend is used."""
    from .backend import FlowerBackend

    return FlowerBackend(**options)


# Registered by the package (``register_backends``); importing this package imports no Flower.
SPEC = BackendSpec(
    name="flower",
    build=build_flower_backend,
    version="0.1.0",
    license="Apache-2.0",
    description="Flower 1.41 deployment: a ServerApp drives m3tfed rounds, one SuperNode per institution (m3tfed serve / join)",
)
