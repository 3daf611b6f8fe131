"""The Flower backend: wire format, bad replies, node state kept between messages, and a
real deployment on 127.0.0.1.

The deployment tests start a SuperLink and three SuperNodes as real processes (insecure,
own free ports, own FLWR_HOME under tmp, telemetry off) and stop every one of them (by
process group) at the end of the module, also when a test fails. Their federation runs
with secure aggregation and DP policies, so privacy is tested on the wire, where every
message is answered by a fresh ClientApp process.
"""

from __future__ import annotations

import contextlib
import json
import stat
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import tiny_config_dict
from flwr.app import Message
from m3tfed.federation.checkpoint import checkpoint_path, load_checkpoint
from m3tfed.federation.config import load_config
from m3tfed.federation.job import (
    build_federation,
    build_institution,
    build_stages,
    resume_job,
    run_job,
)
from m3tfed.federation.server import Failure, Server, screen
from m3tfed.plugin_manager import get_catalogue
from m3tfed.plugins.backends.flower import client_app, wire
from m3tfed.plugins.backends.flower.backend import FlowerBackend
from m3tfed.plugins.backends.flower.deploy import (
    Deployment,
    descendants,
    load_or_make_certificates,
    make_certificates,
)
from m3tfed.plugins.backends.flower.server_app import differs_from_config, run_federation
from m3tfed.privacy.ledger import PrivacyLedger

# No text modality among them (a text encoder pulls in transformers in every ClientApp
# process), and math_academy keeps a personal component, so personal state is exercised.
INSTITUTIONS = ["university", "rural_school", "math_academy"]
# Privacy on the wire: university noises its own updates and requires secure aggregation
# (so every update is masked), math_academy asks for central noise; rural_school has no
# policy (the kill test kills it: nobody waits for its privacy report). Noise is seeded
# from the run seed (testing only) so the Flower run can equal the in-process one.
POLICIES = {
    "university": {"dp": "local", "noise_multiplier": 0.1, "clip_norm": 0.5, "secure_aggregation": True, "reproducible_noise": True},
    "math_academy": {"dp": "central", "noise_multiplier": 0.1, "clip_norm": 0.5, "reproducible_noise": True},
}


def config_dict(rounds: int = 3, privacy: bool = False, **federation) -> dict:
    d = tiny_config_dict(rounds=rounds, n=24, **federation)
    d["institutions"] = [i for i in d["institutions"] if i["name"] in INSTITUTIONS]
    for inst in d["institutions"]:
        if privacy and inst["name"] in POLICIES:
            inst["policy"] = dict(POLICIES[inst["name"]])
    return d


# -- wire format ------------------------------------------------------------------------
def test_generic_payload_round_trips_tensors_bytes_and_int_keys():
    payload = {"round": 3, "keys": {1: b"\x00\xff", 2: b"ab"}, "vec": torch.arange(5, dtype=torch.int64), "nested": [{"w": torch.ones(2, 3)}, (1, "a")], "none": None}
    back = wire.unpack(wire.pack(payload))
    assert back["round"] == 3 and back["none"] is None
    assert back["keys"] == {1: b"\x00\xff", 2: b"ab"}
    assert torch.equal(back["vec"], payload["vec"]) and back["vec"].dtype == torch.int64
    assert torch.equal(back["nested"][0]["w"], torch.ones(2, 3)) and back["nested"][1] == (1, "a")
    with pytest.raises(TypeError, match="cannot send a set"):
        wire.pack({"x": {1, 2}})


# -- bad replies are screened out, never merged -------------------------------------------
class FakeGrid:
    """A Grid whose nodes are in-process institutions; ``tamper(result)`` edits replies."""

    def __init__(self, institutions, tamper=None):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what Flower gives a ServerApp process
        self.institutions = institutions
        self.ids = {name: 100 + k for k, name in enumerate(institutions)}
        self.tamper = tamper or {}
        self.replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.ids.values())

    def push_messages(self, messages):
        ids = []
        for k, m in enumerate(messages):
            name = next(n for n, i in self.ids.items() if i == m.metadata.dst_node_id)
            inst = self.institutions[name]
            if m.metadata.message_type == "train":
                result = inst.train(wire.unpack_job(m.content))
                result = self.tamper.get(name, lambda r: r)(result)
                content = wire.pack_result(result)
            else:
                req = wire.unpack(m.content)
                reply = inst.handle(req["kind"], req["payload"])
                content = wire.pack(client_app.with_policy(inst, reply) if req["kind"] == "capabilities" else reply)
            mid = f"m{len(self.replies)}-{k}"
            reply = Message(content, dst_node_id=0, message_type=m.metadata.message_type)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]


def _stale(result):
    result.updates[0].base_version += 1
    return result


def _extra_component(result):
    u = result.updates[0]
    result.updates.append(type(u)(u.institution, "expert.not_sent", dict(u.delta), u.weight, u.base_version))
    return result


def _wrong_shape(result):
    u = next(u for u in result.updates if any(t.dim() == 2 for t in u.delta.values()))
    key = next(k for k, t in u.delta.items() if t.dim() == 2)
    u.delta[key] = u.delta[key][:, :1].clone()
    return result


@pytest.mark.parametrize(
    "tamper, reason",
    [(_stale, "stale model version"), (_extra_component, "was not sent"), (_wrong_shape, "wrong shape")],
)
def test_bad_replies_are_dropped_with_the_reason_never_merged(tamper, reason, caplog):
    cfg = load_config(config_dict(rounds=1, min_institutions=2))
    fed = build_federation(cfg)
    grid = FakeGrid(fed.institutions, tamper={"rural_school": tamper})
    backend = FlowerBackend(grid, reply_grace_s=5.0)
    backend.discover(INSTITUTIONS, wait_s=5.0)
    assert backend.components_of("rural_school") == fed.institutions["rural_school"].component_names()
    server = Server(cfg, fed.server.catalogue, backend)
    report = server.run_round(1)
    assert reason in report.dropped["rural_school"], report.dropped
    assert report.succeeded == ["math_academy", "university"]
    assert all("rural_school" not in names for names in report.contributors.values())
    assert any("dropped rural_school" in r.message and reason in r.message for r in caplog.records)


# -- a node's state outlives the ClientApp process of one message ---------------------------------
class RestartingGrid(FakeGrid):
    """A Grid whose messages are answered as a SuperNode answers them: by the ClientApp's
    own handlers, each in a "fresh process" (the per-process institution dropped first),
    with each institution's ``state-dir`` under ``state_root``."""

    def __init__(self, config: Path, names: list[str], state_root: Path):
        super().__init__({n: None for n in names})
        self.config, self.state_root = config, state_root
        self.kept: dict[str, int] = {}  # every file seen in a node's run folder -> its mode

    def push_messages(self, messages):
        from flwr.app import Context, RecordDict

        ids = []
        for m in messages:
            name = next(n for n, i in self.ids.items() if i == m.metadata.dst_node_id)
            mid = f"m{len(self.kept)}-{time.monotonic_ns()}"
            m.metadata.__dict__["_message_id"] = mid
            client_app._NODE.clear()  # a new process: nothing survives in memory
            node_config = {"config": str(self.config), "institution": name, "state-dir": str(self.state_root / name)}
            context = Context(run_id=1, node_id=m.metadata.dst_node_id, node_config=node_config, state=RecordDict(), run_config={})
            reply = (client_app.train if m.metadata.message_type == "train" else client_app.query)(m, context)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self.replies[mid] = reply
            ids.append(mid)
            for path in (self.state_root / name / "runs").rglob("*.json"):
                self.kept[str(path.relative_to(self.state_root))] = stat.S_IMODE(path.stat().st_mode)
        return ids


def test_secagg_and_dp_state_survive_a_new_clientapp_process_per_message(tmp_path):
    config = tmp_path / "federation.toml"
    config.write_text(tomli_w.dumps(config_dict(rounds=2, privacy=True, min_institutions=2)))
    grid = RestartingGrid(config, INSTITUTIONS, tmp_path / "nodes")
    run_dir = tmp_path / "flower"
    with one_thread():  # the ClientApp runs on one thread, as on a node
        first = run_federation(grid, config, run_dir, stop_after=1, wait_nodes_s=5.0)
        second = run_federation(grid, None, run_dir, resume=True, wait_nodes_s=5.0)
    assert first["last_round"] == 1 and second["done"] and "excluded" not in second
    assert_same_run(run_dir, in_process_run(config, tmp_path / "runs", stop_after=1), rounds=2)
    # secrets and accounts were on disk between messages, readable by the node's user only;
    # a finished session's secrets are not left behind
    run_id = json.loads((run_dir / "run.json").read_text())["id"]
    assert grid.kept[f"university/runs/{run_id}/stages/secagg.json"] == 0o600
    assert grid.kept[f"university/runs/{run_id}/privacy.json"] == 0o600
    assert not (tmp_path / "nodes" / "university" / "runs" / run_id / "stages" / "secagg.json").exists()


@contextlib.contextmanager
def one_thread():
    """Torch on one thread, as every ClientApp process runs (``OMP_NUM_THREADS=1``): a
    matmul split over two threads sums in another order and rounds differently."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def in_process_run(config: Path, runs_dir: Path, stop_after: int) -> Path:
    """The same federation with the in-process backend, stopped after round
    ``stop_after`` and resumed from its checkpoint, as the Flower run is: the two runs
    take exactly the same path, restart included."""
    with one_thread():
        run_job(config, name="in-process", runs_dir=runs_dir, stop_after=stop_after, progress=lambda _: None)
        resume_job(runs_dir / "in-process", progress=lambda _: None)
    return runs_dir / "in-process"


def assert_same_run(flower_dir: Path, sim_dir: Path, rounds: int) -> None:
    """Same weights, rounds (who succeeded, who was summed into each component) and
    privacy ledger (epsilon per round for each noisy institution, nothing held back)."""
    flower, flower_meta = load_checkpoint(checkpoint_path(flower_dir, rounds))
    sim, sim_meta = load_checkpoint(checkpoint_path(sim_dir, rounds))
    assert sorted(flower) == sorted(sim)
    for key, value in flower.items():
        assert torch.equal(value, sim[key]), f"{key} differs by {float((value - sim[key]).abs().max())}"
    for got, expected in zip(flower_meta["history"], sim_meta["history"], strict=True):
        assert got["succeeded"] == expected["succeeded"] == sorted(INSTITUTIONS), got["dropped"]
        assert got["contributors"] == expected["contributors"]
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6, nan_ok=True)  # nan: withheld under secure aggregation
    ledger, expected = PrivacyLedger.read(flower_dir).to_dict(), PrivacyLedger.read(sim_dir).to_dict()
    assert ledger["components"] == expected["components"]
    for name in POLICIES:
        rows = ledger["institutions"][name]
        assert sorted(rows, key=int) == [str(r) for r in range(1, rounds + 1)]
        for r, row in rows.items():
            assert row["epsilon_round"] > 0, row
            # held only where it is alone in a group: its client does not join a group of one
            assert all(h["rule"] == "secure_aggregation" and "among 1 holders" in h["reason"] for h in row["held"]), row
            assert row["epsilon_total"] == pytest.approx(expected["institutions"][name][r]["epsilon_total"])
        assert rows[str(rounds)]["epsilon_total"] > rows["1"]["epsilon_total"]


def test_a_node_whose_policy_differs_from_the_coordinators_config_is_kept_out(caplog):
    # the nodes run with their own policies; the coordinator's config has university's
    # with other noise and a budget the node never agreed to
    nodes = build_federation(load_config(config_dict(rounds=1, privacy=True, min_institutions=2)))
    d = config_dict(rounds=1, privacy=True, min_institutions=2)
    d["institutions"][[i["name"] for i in d["institutions"]].index("university")]["policy"].update(noise_multiplier=0.2, epsilon=9.0)
    cfg = load_config(d)
    backend = FlowerBackend(FakeGrid(nodes.institutions), reply_grace_s=5.0)
    caps = backend.discover(INSTITUTIONS, wait_s=5.0)
    reasons = {i.name: differs_from_config(i, caps[i.name]) for i in cfg.institutions}
    assert reasons["math_academy"] is None and reasons["rural_school"] is None
    assert "policy.noise_multiplier: node 0.1, config 0.2" in reasons["university"]
    assert "policy.epsilon: node None, config 9.0" in reasons["university"]
    backend.exclude("university", reasons["university"])
    _, stages = build_stages(cfg, get_catalogue())
    report = Server(cfg, get_catalogue(), backend, server_stages=stages).run_round(1)
    assert report.succeeded == ["math_academy", "rural_school"]
    assert "kept out of this federation" in report.dropped["university"] and "noise_multiplier" in report.dropped["university"]
    assert all("university" not in names for names in report.contributors.values())
    assert any("university is kept out" in r.message for r in caplog.records)
    with pytest.raises(Exception, match="kept out"):
        backend.ask("university", "privacy_report", {"round": 1})


def test_screen_checks_a_reply_against_its_job_and_the_server_state():
    cfg = load_config(config_dict(rounds=1))
    fed = build_federation(cfg)
    server = fed.server
    job = server.make_job("university", 1, 0)
    result = fed.institutions["university"].train(job)
    assert screen(result, job, server.state) is None
    assert "answers a job for" in screen(result, server.make_job("rural_school", 1, 0), server.state)
    assert screen(Failure("university", "no reply within 5s"), job, server.state) == "no reply within 5s"
    u = result.updates[0]
    u.delta[next(iter(u.delta))] = torch.zeros(7)
    assert "wrong shape" in screen(result, job, server.state)
    assert screen(result, job, server.state, encoded=True) is None  # a secagg stage checks its own vectors


def test_one_institution_is_built_alone_with_the_same_data_and_selection():
    cfg = load_config(config_dict(rounds=1))
    fed = build_federation(cfg)
    alone = build_institution(cfg, "math_academy")
    full = fed.institutions["math_academy"]
    assert alone.experts == full.experts and alone.component_names() == full.component_names()
    assert torch.equal(alone.data.train["targets"]["grade"], full.data.train["targets"]["grade"])
    with pytest.raises(Exception, match="no institution named 'nowhere'"):
        build_institution(cfg, "nowhere")


def test_certificates_name_loopback(tmp_path):
    from cryptography import x509

    certs = make_certificates(tmp_path)
    cert = x509.load_pem_x509_certificate(certs.cert.read_bytes())
    ca = x509.load_pem_x509_certificate(certs.ca.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)


def test_a_restarted_coordinator_keeps_the_ca_its_nodes_trust(tmp_path):
    first = Deployment(tmp_path / "home").certificates
    again = Deployment(tmp_path / "home").certificates  # e.g. `m3tfed serve --resume`
    assert again.ca.read_bytes() == first.ca.read_bytes() and again.cert.read_bytes() == first.cert.read_bytes()
    with pytest.raises(Exception, match="not 10.0.0.7"):
        load_or_make_certificates(tmp_path / "home" / "certificates", hosts=("10.0.0.7",))


def test_serve_with_a_ca_but_no_certificate_or_key_says_what_is_missing(tmp_path, capsys):
    from m3tfed.cli import main

    ca = make_certificates(tmp_path / "certs").ca
    assert main(["serve", "federation.toml", "--ca", str(ca), "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert "--cert and --key missing" in err and "m3tfed certs" in err
    assert main(["serve", "federation.toml", "--ca", str(ca), "--cert", str(tmp_path / "nope.crt"), "--key", str(ca)]) == 2
    assert "nope.crt does not exist" in capsys.readouterr().err


def test_stop_ends_the_helpers_of_a_process_that_already_died(tmp_path):
    dep = Deployment(tmp_path, insecure=True)
    # a "SuperNode" with two helpers in its process group and one in a session of its own
    script = "(exec -a flwr-clientapp sleep 300) & (exec -a flower-superexec sleep 300) & setsid bash -c 'exec -a flwr-serverapp sleep 300' & wait"
    proc = dep._start("supernode-x", ["bash", "-c", script], tmp_path)
    deadline = time.monotonic() + 10
    while len(descendants(proc.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    helpers = descendants(proc.pid)
    assert len(helpers) == 3
    dep.kill("supernode-x")  # as a crash: the helpers are orphaned, still running
    assert all(_running(pid) for pid in helpers)
    dep.stop()
    time.sleep(0.2)
    assert not [pid for pid in helpers if _running(pid)]


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- a real deployment on loopback -----------------------------------------------------------
@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flower")
    dep = Deployment(folder, insecure=True)  # loopback test only; TLS is the default
    started: list[int] = []
    try:
        dep.start_superlink()
        config = folder / "federation.toml"
        config.write_text(tomli_w.dumps(config_dict(rounds=3, privacy=True, min_institutions=2)))
        for name in INSTITUTIONS:
            dep.start_supernode(name, config)
        started = [p.pid for p in dep.processes.values()]
        yield dep, config
    finally:
        spawned = [c for pid in started for c in descendants(pid)]
        dep.stop()
        time.sleep(0.5)
        # also the helpers of the node the kill test crashed (orphans, in its process group)
        alive = [pid for pid in {*started, *spawned, *_members_of_groups(started)} if _running(pid)]
        assert not alive, f"processes left running: {alive}"


def _members_of_groups(groups: list[int]) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2]) in groups:
                out.append(int(entry.name))
        except OSError:
            continue
    return out


def _flower_run(dep: Deployment, config: Path, run_dir: Path, **run_config) -> dict:
    # generous: every message starts a process, and secure aggregation sends ~15 in a row
    # per round (a few seconds each on an idle 2-core machine, far more on a busy one)
    done = dep.run(config, run_dir, timeout=900, wait_nodes_s=90.0, **run_config)
    out = run_dir / "flower.json"
    assert out.exists(), f"flwr run exited {done.returncode} without a result; see {dep.folder / 'logs'}"
    return json.loads(out.read_text())


def test_secagg_and_dp_rounds_on_flower_equal_the_in_process_run_and_resume_from_checkpoint(deployment, tmp_path):
    dep, config = deployment
    run_dir = tmp_path / "run"
    # the coordinator stops after round 1 (its checkpoint and ledger are written), then a
    # new coordinator resumes from m3tfed's checkpoint: Flower does not resume a run itself
    first = _flower_run(dep, config, run_dir, stop_after=1)
    assert first["last_round"] == 1 and not first["done"]
    caps = json.loads((run_dir / "capabilities.json").read_text())
    assert sorted(caps) == sorted(INSTITUTIONS)  # no "excluded": every node's policy is the config's
    assert caps["math_academy"]["personal"] == ["task.symbol"] and caps["university"]["policy"]["dp"] == "local"
    assert sorted(json.loads((run_dir / "privacy_ledger.json").read_text())["components"]) == ["1"]
    second = _flower_run(dep, config, run_dir, resume=True)
    assert second["resumed_after"] == 1 and second["done"] and second["last_round"] == 3
    # weights, contributors and the ledger's epsilon per round equal the in-process run's:
    # the nodes' accountants and secrets carried over from message to message and across
    # the coordinator restart
    assert_same_run(run_dir, in_process_run(config, tmp_path / "runs", stop_after=1), rounds=3)
    run_id = json.loads((run_dir / "run.json").read_text())["id"]
    node_run = dep.folder / "nodes" / "university" / "state" / "runs" / run_id
    assert stat.S_IMODE((node_run / "privacy.json").stat().st_mode) == 0o600
    assert not (node_run / "stages" / "secagg.json").exists()  # a finished session's secrets are gone


def test_a_supernode_killed_mid_round_is_dropped_after_its_timeout_and_the_run_goes_on(deployment, tmp_path):
    dep, node_config = deployment
    # Without the privacy policies, to keep this test short (secure aggregation sends ~15
    # messages a round; tests/test_secagg.py covers a dropout under it). The nodes read
    # their config file at every message (a fresh ClientApp process each), so this run's
    # federation is the plain one, on both sides.
    plain = tomli_w.dumps(config_dict(rounds=2, min_institutions=2, timeout_s=20.0))
    config = tmp_path / "short.toml"
    config.write_text(plain)
    run_dir = tmp_path / "faulty"
    with_privacy = node_config.read_text()
    node_config.write_text(plain)
    log = dep.folder / "logs" / "supernode-rural_school.log"
    before = log.read_text(errors="replace").count("Receiving: train message")

    import threading

    killed = threading.Event()

    def kill_when_training_starts():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if log.read_text(errors="replace").count("Receiving: train message") > before:
                dep.kill("supernode-rural_school")
                killed.set()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_when_training_starts, daemon=True)
    watcher.start()
    try:
        out = _flower_run(dep, config, run_dir, reply_grace_s=5.0)
    finally:
        node_config.write_text(with_privacy)
    watcher.join(timeout=5)
    assert killed.is_set(), "the node never received its training message"
    first, second = out["history"]
    assert "no reply within 25s" in first["dropped"]["rural_school"]
    # the run goes on: round 2 trains and aggregates with the two nodes left
    assert out["done"] and first["succeeded"] == second["succeeded"] == ["math_academy", "university"]
    assert "rural_school" in second["dropped"]
    assert all("rural_school" not in names for h in (first, second) for names in h["contributors"].values())
    assert second["contributors"]["trunk"] == ["math_academy", "university"]
    assert checkpoint_path(run_dir, 2).exists()


def test_flower_backend_is_a_registered_plugin_that_explains_where_it_runs():
    spec = get_catalogue().get("backend", "flower")
    with pytest.raises(Exception, match="m3tfed serve"):
        spec.build(institutions={})
