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
    """Each hook has a test named after it, and a built-in implementation."""
    from m3tfed.plugin_manager import HOOK_KINDS, get_catalogue

    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    assert f"def test_hook_{hook}(" in tests, f"no test named test_hook_{hook}"
    cat = get_catalogue()
    builtin = cat.specs[HOOK_KINDS[hook]] if hook in HOOK_KINDS else {"register_message_handlers": cat.message_handlers, "register_commands": cat.commands}[hook]
    assert builtin, f"no built-in plugin implements {hook}"
