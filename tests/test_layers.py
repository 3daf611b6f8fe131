"""The core's import graph, read from the source (ast), not from what happens to be
imported: core names no concrete plugin, and no module imports a layer above its own.

Layers, lowest first (ARCHITECTURE: cli -> federation -> privacy -> model/moe ->
specs/contracts -> errors): an import may only go to the same layer or a lower one.
Imports under ``if TYPE_CHECKING:`` are annotations only and never run, so they do not
count. Known violations are listed explicitly, each with who removes it: a new one
fails, and one that was fixed fails until it is taken off the list.
"""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "core"

LAYERS = {
    "errors": 0,
    "files": 0,  # atomic writes, imports nothing of m3tfed
    # contracts and the types they speak in
    "specs": 1,
    "messages": 1,
    "hookspecs": 1,
    "defaults": 1,
    "config": 1,
    "aggregation": 1,
    "interfaces": 1,
    "contracts": 1,
    "modules": 1,
    "data": 1,  # the data-source kit: tensor trees, splits, partitioners (torch only)
    "seeds": 1,  # stable seeds from parts, imports nothing
    "threads": 1,  # process settings (torch threads), imports only torch
    "registry": 1,
    "plugin_manager": 1,
    # the model
    "model": 2,
    "moe": 2,
    "training": 2,  # local training: the plain trainer, the optimizer and its saved moments
    "privacy": 3,
    "federation": 4,
    # tools on top: the command line and the author's kit (check_backend runs a federation)
    "cli": 5,
    "testing": 5,
}

# (importing module, imported module) -> who removes it. Empty: core/privacy sits below
# core/federation (issue 13, item 4); a new upward import fails, and gets fixed, not listed.
KNOWN_UPWARD: dict[tuple[str, str], str] = {}
# Issue 13, item 3: core imports no plugin (DP-SGD asks a router for its per-sample rule).
KNOWN_PLUGIN_IMPORTS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE).with_suffix("").parts
    return ".".join(("m3tfed", *parts[:-1], *([] if parts[-1] == "__init__" else [parts[-1]])))


def is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:]) if name != "m3tfed" else Path()
    return (CORE / rel).with_suffix(".py").is_file() or (CORE / rel / "__init__.py").is_file()


def runtime_nodes(tree: ast.AST):
    """Every node except the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if (
                isinstance(child, ast.If)
                and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING"
            ):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports(path: Path) -> set[str]:
    """Absolute names of the m3tfed modules ``path`` imports (``from . import x`` is
    module ``x`` when ``x`` is a module, its package otherwise)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            subs = [f"{name}.{a.name}" for a in node.names if is_module(f"{name}.{a.name}")]
            found |= set(subs) if subs else {name}
    return {n for n in found if n == "m3tfed" or n.startswith("m3tfed.")}


GRAPH = {module_name(p): imports(p) for p in sorted(CORE.rglob("*.py"))}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None  # the package facade has none


def test_the_walk_sees_the_known_imports():
    # a walk that found nothing would pass every test below
    assert "m3tfed.messages" in GRAPH["m3tfed.federation.server"]
    assert "m3tfed.hookspecs" in GRAPH["m3tfed.plugin_manager"]  # from . import hookspecs
    assert "m3tfed.federation.institution" not in GRAPH["m3tfed.interfaces"]  # TYPE_CHECKING only
    assert all(layer(m) is not None for m in GRAPH if m != "m3tfed"), "a core module has no layer"


def test_core_imports_no_plugin():
    found = {
        (m, i)
        for m, names in GRAPH.items()
        for i in names
        if i.startswith(("m3tfed.plugins", "m3tfed.experts"))
    }
    new = sorted(found - set(KNOWN_PLUGIN_IMPORTS))
    assert not new, (
        f"core imports a concrete plugin: {new}; ask the catalogue for a capability instead"
    )
    fixed = sorted(set(KNOWN_PLUGIN_IMPORTS) - found)
    assert not fixed, f"fixed, take them off KNOWN_PLUGIN_IMPORTS: {fixed}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m != "m3tfed"))
def test_no_import_goes_up_a_layer(module):
    mine = layer(module)
    upward = {(module, i) for i in GRAPH[module] if (layer(i) or 0) > mine}
    new = sorted(upward - set(KNOWN_UPWARD))
    assert not new, f"upward imports (layer {mine} importing a higher layer): {new}"


def test_known_upward_imports_are_still_there():
    found = {(m, i) for m, names in GRAPH.items() for i in names}
    fixed = sorted(set(KNOWN_UPWARD) - found)
    assert not fixed, f"fixed, take them off KNOWN_UPWARD: {fixed}"


# Members every UpdateStage has (m3tfed.interfaces.UpdateStage): core calls them, it does
# not probe for them. Only the adapter for duck-typed stages (interfaces.py) reads them
# with getattr, once, where a stage is built.
STAGE_MEMBERS = {"side", "order", "server_order", "begin_round", "secure_aggregation"}


def test_core_calls_stage_members_instead_of_probing_for_them():
    probes = []
    for path in sorted(CORE.rglob("*.py")):
        if path.name == "interfaces.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) in ("getattr", "hasattr")
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value in STAGE_MEMBERS
            ):
                probes.append(f"{path.relative_to(CORE)}:{node.lineno} {node.func.id}(..., {node.args[1].value!r})")
    assert not probes, f"probing for UpdateStage members: {probes}"
