"""Every hook is documented with its exact signature and exercised by a test (Datasette's rule)."""

import inspect
from pathlib import Path

import pytest
from m3tfed import hookspecs

ROOT = Path(__file__).resolve().parents[1]
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "m3tfed_spec")]


def test_there_are_hooks():
    assert len(HOOKS) == 10


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_are_documented(hook):
    sig = f"### {hook}{inspect.signature(getattr(hookspecs, hook))}"
    assert sig in (ROOT / "docs" / "plugins.md").read_text()


@pytest.mark.parametrize("hook", HOOKS)
def test_plugin_hooks_have_tests(hook):
    from m3tfed.plugin_manager import HOOK_KINDS, get_catalogue

    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_hooks.py")
    if hook not in HOOK_KINDS:  # the hooks that extend the host: a test named after the hook
        cat = get_catalogue()
        assert {"register_message_handlers": cat.message_handlers, "register_commands": cat.commands}[hook], f"no plugin implements {hook}"
        assert f"def test_hook_{hook}(" in tests
        return
    # each hook has a built-in implementation, and some test registers through it or its spec
    assert get_catalogue().specs[HOOK_KINDS[hook]], f"no plugin implements {hook}"
    spec_class = {"encoder": "EncoderSpec", "expert": "ExpertSpec", "task": "TaskSpec", "router": "RouterSpec",
                  "aggregator": "AggregatorSpec", "data": "DataSourceSpec", "backend": "BackendSpec", "stage": "UpdateStageSpec"}[HOOK_KINDS[hook]]
    assert hook in tests or spec_class in tests, f"no test names {hook} or {spec_class}"
