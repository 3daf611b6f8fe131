"""The two hooks that extend the host rather than add a plugin kind:
``register_message_handlers`` (what an institution answers besides training) and
``register_commands`` (``m3tfed`` subcommands; the Flower backend adds serve/join/certs)."""

import pytest
from conftest import tiny_config_dict
from m3tfed import get_catalogue, hookimpl, plugin_manager
from m3tfed.cli import build_parser, main
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugin_manager import catalogue_from


def count_samples(institution, payload):
    return {
        "name": institution.name,
        "num_train": institution.data.num_train,
        "echo": payload["x"] * 2,
    }


class Messages:
    __name__ = "messages_pkg"

    @hookimpl
    def register_message_handlers(self, register):
        register("count_samples", count_samples)


def test_hook_register_message_handlers():
    cat = catalogue_from([Messages()])
    assert (
        cat.message_handlers["count_samples"] is count_samples
        and cat.handler_packages["count_samples"] == "messages_pkg"
    )
    fed = build_federation(load_config(tiny_config_dict(rounds=1)), catalogue=cat)
    name, inst = next(iter(fed.institutions.items()))
    # the server asks through the backend; the institution answers with the plugin's handler
    reply = fed.server.backend.ask(name, "count_samples", {"x": 21})
    assert reply == {"name": name, "num_train": inst.data.num_train, "echo": 42}
    with pytest.raises(ValueError, match="unknown message kind 'nope'.*count_samples"):
        inst.handle("nope", {})


def test_builtin_secure_aggregation_messages_come_through_the_hook():
    from m3tfed.plugins.pipeline.secagg import CLIENT_METHODS

    cat = get_catalogue()
    assert set(CLIENT_METHODS) <= set(cat.message_handlers)
    assert {cat.handler_packages[k] for k in CLIENT_METHODS} == {"m3tfed"}


class BadMessages:
    __name__ = "bad_messages_pkg"

    @hookimpl
    def register_message_handlers(self, register):
        register("capabilities", count_samples)  # core's own
        register("count_samples", "not callable")
        register("bad kind!", count_samples)
        register("fine", count_samples)


def test_bad_message_handlers_are_reported_naming_the_plugin():
    cat = catalogue_from([BadMessages()])
    errors = [str(b) for b in cat.broken if b.plugin == "bad_messages_pkg"]
    assert len(errors) == 3, errors
    assert any("'capabilities' is answered by m3tfed itself" in e for e in errors)
    assert any("not callable" in e for e in errors)
    assert any("'bad kind!'" in e for e in errors)
    assert "fine" in cat.message_handlers and "capabilities" not in cat.message_handlers


def hello_arguments(parser):
    parser.add_argument("--times", type=int, default=1)


def hello(args):
    print("hello " * args.times)
    return 7


class Commands:
    __name__ = "commands_pkg"

    @hookimpl
    def register_commands(self, register):
        register("hello", "say hello", hello_arguments, hello)
        register("run", "would shadow the built-in", hello_arguments, hello)


def test_hook_register_commands(monkeypatch, capsys):
    cat = catalogue_from([Commands()])
    monkeypatch.setattr(plugin_manager, "get_catalogue", lambda refresh=False: cat)
    assert main(["hello", "--times", "2"]) == 7
    assert capsys.readouterr().out.strip() == "hello hello"
    # a plugin command cannot take a built-in's name: `run` is still m3tfed's
    from m3tfed.cli import cmd_run

    assert build_parser().parse_args(["run"]).func is cmd_run


def test_flower_commands_come_from_the_backend_plugin():
    cat = get_catalogue()
    assert {"serve", "join", "certs"} <= set(cat.commands)
    assert {cat.commands[n].package for n in ("serve", "join", "certs")} == {"m3tfed"}
    assert cat.commands["serve"].run.__module__ == "m3tfed.plugins.backends.flower.commands"
    args = build_parser().parse_args(
        ["join", "fed.toml", "--institution", "a", "--superlink", "h:1", "--insecure"]
    )
    assert (args.institution, args.superlink, args.insecure) == ("a", "h:1", True)
