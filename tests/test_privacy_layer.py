"""The privacy layer sits below the federation and knows no plugin: it asks for
capabilities (a router's ``per_sample_rule``), never imports ``m3tfed.plugins``."""

import ast
from pathlib import Path

import pytest
from m3tfed.privacy.dpsgd import PER_SAMPLE_RULE, UnsupportedModel

PRIVACY = Path(__file__).resolve().parents[1] / "core" / "privacy"
# None left: the split helpers moved down to m3tfed.data, the atomic JSON writer to
# m3tfed.files, and the membership-inference experiment (it builds federations) up to
# m3tfed.federation.attacks.
REMAINING: set[tuple[str, str]] = set()


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            out.add(module if node.level == 0 else "." * node.level + module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_core_privacy_imports_no_plugin_and_nothing_of_the_federation_beyond_the_named_rest():
    upward, plugins = set(), []
    for path in sorted(PRIVACY.glob("*.py")):
        for module in imports(path):
            name = module.lstrip(".")
            if "plugins" in name.split(".") or "experts" in name.split("."):
                plugins.append((path.name, module))
            if module.startswith("..federation") or name.startswith("m3tfed.federation"):
                upward.add((path.name, name.removeprefix("m3tfed.")))
    assert plugins == []
    assert upward <= REMAINING, sorted(upward - REMAINING)


def test_dp_sgd_asks_the_router_for_its_per_sample_rule():
    from m3tfed.plugins.routers.topk import TopKRouter

    assert vars(TopKRouter)["per_sample_rule"] == PER_SAMPLE_RULE

    class Reweighted(TopKRouter):  # a subclass may change the rule: it does not inherit the claim
        pass

    from m3tfed.privacy.dpsgd import _PerSampleTrace

    moe = type("MoE", (), {"router": Reweighted(8, 4)})()
    trace = _PerSampleTrace.__new__(_PerSampleTrace)
    with pytest.raises(UnsupportedModel, match="does not declare per_sample_rule"):
        trace._install_moe(moe)
