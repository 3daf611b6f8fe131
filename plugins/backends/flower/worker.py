"""A warm ClientApp executor for one institution's SuperNode: every message in one process.

Flower 1.41's SuperNode hands each message to its SuperExec, which starts a fresh
``flwr-clientapp`` process per message: Python, Flower, torch and m3tfed are imported
and the institution (data, model) is built again for every message, seconds each time,
several times a round. Flower's own answer to this (warm executor pools) exists only for
Kubernetes. This module is a SuperExec for a SuperNode started with ``--isolation
process`` (Flower's mode for an externally run executor): Flower's own SuperExec loop
(``run_superexec``: acquire a task and its token from the SuperNode's Runtime API), with
an executor that runs each task in this process, with Flower's own ClientApp steps
(``run_clientapp``'s pull task input, load the app from its FAB, call it, push the reply
and the task's status). Imports happen once, the FAB is installed once per hash, and the
m3tfed ClientApp keeps the institution it built (``client_app.institution``) across
messages; state it must not lose still goes to its state folder after every message.

Tasks run one after another, as a node answers its messages. A task that raises is
answered with Flower's error reply (the coordinator sees the reason), and the process
goes on with the next one.

Not here: what the ClientApp does (``client_app.py``); starting the processes (``deploy``).
Run: ``python -m m3tfed.plugins.backends.flower.worker --runtime-api-address HOST:PORT
[--insecure | --root-certificates CA] [--parent-pid PID]`` (``deploy`` does it).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger("m3tfed.flower")


class InProcessExecutor:
    """A SuperExec executor (``flwr.supercore.superexec.executor`` protocol) that runs
    each ClientApp task in this process instead of starting ``flwr-clientapp``."""

    def __init__(self) -> None:
        self.apps: dict[str, Any] = {}  # FAB hash -> its loaded ClientApp

    def get_eligible_capacity(
        self, supported_task_types, *, insecure=False, root_certificates_path=None
    ):
        return supported_task_types, set()

    def wait_for_capacity(
        self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None
    ) -> None:
        return None

    def reconcile(self) -> None:
        return None

    def close(self) -> None:
        return None

    def launch(self, spec: Any) -> Any:
        from flwr.supercore.superexec.executor.types import LaunchResult

        self.run_task(spec)
        return LaunchResult.accepted()

    def run_task(self, spec: Any) -> None:
        """One ClientApp task, as ``flwr-clientapp --token`` runs it (``run_clientapp``)."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supercore.interceptors import (
            RuntimeTokenHttpInterceptor,
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime.run_clientapp import (
            pull_task_input,
            push_message,
            push_task_output,
        )

        t0 = time.perf_counter()
        client = RuntimeHttpClient.from_server_address(
            server_address=spec.runtime_api_address,
            insecure=spec.insecure,
            root_certificates=validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(spec.token),
            ],
            retry_invoker=make_simple_http_retry_invoker(),
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        t_pull = t_run = t0
        try:
            message, context, run, fab = pull_task_input(client)
            t_pull = time.perf_counter()
            app = self._app(run, fab)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # the coordinator gets the reason, this node goes on
            log.exception("ClientApp task %s raised", spec.task_id)
            details = f"{type(exc)}:<'{exc}'>"
            if message is not None:
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                    reply_to=message,
                )
        finally:
            t_run = time.perf_counter()
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:
                log.exception("could not push the reply of task %s", spec.task_id)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
        end = time.perf_counter()
        log.info(
            "task %s: pulled in %.3fs, ran in %.3fs, pushed in %.3fs",
            spec.task_id,
            t_pull - t0,
            t_run - t_pull,
            end - t_run,
        )

    def _app(self, run: Any, fab: Any) -> Any:
        """The FAB's ClientApp, installed and loaded on its first task only."""
        if fab.hash_str not in self.apps:
            from flwr.cli.install import install_from_fab
            from flwr.clientapp.utils import get_load_client_app_fn

            install_from_fab(fab.content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[fab.hash_str] = load(run.fab_id, run.fab_version, fab.hash_str)
        return self.apps[fab.hash_str]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--runtime-api-address",
        required=True,
        help="the SuperNode's Runtime API (its --host:--port)",
    )
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--root-certificates", default=None)
    p.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="stop when this process (the SuperNode) is gone",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per poll otherwise
    import flwr.supercore.superexec.run_superexec as superexec

    # m3tfed's ClientApp (torch, the plugins) imported while the node connects, not
    # while the coordinator waits for the first answer
    importlib.import_module("m3tfed.plugins.backends.flower.client_app")

    executor = InProcessExecutor()
    superexec.get_executor = lambda *a, **k: executor  # Flower's loop, this executor
    try:
        superexec.run_superexec(
            runtime_api_address=args.runtime_api_address,
            insecure=args.insecure,
            root_certificates_path=args.root_certificates,
            parent_pid=args.parent_pid,
            runtime_dependency_install=False,
        )
    except SystemExit as stop:  # Flower's exit (SIGTERM, SIGINT, its node gone): handlers ran
        exit_now(stop.code)


def exit_now(code: int | str | None) -> None:
    """Exit without the interpreter's teardown: freeing torch's and transformers' modules
    costs seconds of CPU (4 s per worker on a loaded 2-core machine, so a deployment's
    stop waited on its workers), and nothing is left to save, since the ClientApp writes
    its state after every message. Flower's exit code is kept."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    main()
