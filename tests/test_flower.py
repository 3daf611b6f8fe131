"""The Flower backend: wire format, bad replies, and a real deployment on 127.0.0.1.

The deployment tests start a SuperLink and three SuperNodes as real processes (insecure,
own free ports, own FLWR_HOME under tmp, telemetry off) and stop every one of them by
its own pid at the end of the module, also when a test fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import tiny_config_dict
from flwr.app import Message
from m3tfed.federation.checkpoint import checkpoint_path, load_checkpoint, unflatten_components
from m3tfed.federation.config import load_config
from m3tfed.federation.job import build_federation, build_institution
from m3tfed.federation.server import Failure, Server, screen
from m3tfed.plugin_manager import get_catalogue
from m3tfed.plugins.backends.flower import wire
from m3tfed.plugins.backends.flower.backend import FlowerBackend
from m3tfed.plugins.backends.flower.deploy import Deployment, descendants, make_certificates

# No text modality among them (a text encoder pulls in transformers in every ClientApp
# process), and math_academy keeps a personal component, so personal state is exercised.
INSTITUTIONS = ["university", "rural_school", "math_academy"]


def config_dict(rounds: int = 3, **federation) -> dict:
    d = tiny_config_dict(rounds=rounds, n=24, **federation)
    d["institutions"] = [i for i in d["institutions"] if i["name"] in INSTITUTIONS]
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
                content = wire.pack(inst.handle(req["kind"], req["payload"]))
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


# -- a real deployment on loopback -----------------------------------------------------------
@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flower")
    dep = Deployment(folder, insecure=True)  # loopback test only; TLS is the default
    started: list[int] = []
    try:
        dep.start_superlink()
        config = folder / "federation.toml"
        config.write_text(tomli_w.dumps(config_dict(rounds=3, min_institutions=2)))
        for name in INSTITUTIONS:
            dep.start_supernode(name, config)
        started = [p.pid for p in dep.processes.values()]
        yield dep, config
    finally:
        spawned = [c for pid in started for c in descendants(pid)]
        dep.stop()
        time.sleep(0.5)
        alive = [pid for pid in started + spawned if Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
        assert not alive, f"processes left running: {alive}"


def _flower_run(dep: Deployment, config: Path, run_dir: Path, **run_config) -> dict:
    done = dep.run(config, run_dir, timeout=240, wait_nodes_s=90.0, **run_config)
    out = run_dir / "flower.json"
    assert out.exists(), f"flwr run exited {done.returncode} without a result; see {dep.folder / 'logs'}"
    return json.loads(out.read_text())


def _final_state(run_dir: Path, rnd: int) -> dict:
    tensors, _ = load_checkpoint(checkpoint_path(run_dir, rnd))
    return unflatten_components({k: v for k, v in tensors.items() if not k.startswith("aggregator::")})


def test_three_rounds_on_flower_equal_the_in_process_run_and_resume_from_checkpoint(deployment, tmp_path):
    dep, config = deployment
    run_dir = tmp_path / "run"
    # the coordinator stops after round 2 (its checkpoint is written), then a new
    # coordinator resumes from m3tfed's checkpoint: Flower does not resume a run itself
    first = _flower_run(dep, config, run_dir, stop_after=2)
    assert first["last_round"] == 2 and not first["done"]
    caps = json.loads((run_dir / "capabilities.json").read_text())
    assert sorted(caps) == sorted(INSTITUTIONS)
    assert caps["math_academy"]["personal"] == ["task.symbol"] and "policy" in caps["math_academy"]
    second = _flower_run(dep, config, run_dir, resume=True)
    assert second["resumed_after"] == 2 and second["done"] and second["last_round"] == 3
    assert [h["succeeded"] for h in second["history"]] == [sorted(INSTITUTIONS)] * 3

    sim = build_federation(load_config(config))
    for rnd in range(1, 4):
        sim.server.run_round(rnd)
    flower_state = _final_state(run_dir, 3)
    assert sorted(flower_state) == sorted(c for c, s in sim.server.state.items() if s)
    for comp, params in flower_state.items():
        for key, value in params.items():
            expected = sim.server.state[comp][key]
            assert torch.equal(value, expected), f"{comp}:{key} differs by {float((value - expected).abs().max())}"
    assert second["history"][-1]["loss"] == pytest.approx(sim.server.history[-1].loss, rel=1e-6)


def test_a_supernode_killed_mid_round_is_dropped_after_its_timeout(deployment, tmp_path):
    dep, _ = deployment
    config = tmp_path / "short.toml"
    config.write_text(tomli_w.dumps(config_dict(rounds=1, min_institutions=2, timeout_s=20.0)))
    run_dir = tmp_path / "faulty"
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
    out = _flower_run(dep, config, run_dir, reply_grace_s=5.0)
    watcher.join(timeout=5)
    assert killed.is_set(), "the node never received its training message"
    rep = out["history"][0]
    assert out["done"] and rep["succeeded"] == ["math_academy", "university"]
    assert "no reply within 25s" in rep["dropped"]["rural_school"]
    assert checkpoint_path(run_dir, 1).exists()


def test_flower_backend_is_a_registered_plugin_that_explains_where_it_runs():
    spec = get_catalogue().get("backend", "flower")
    with pytest.raises(Exception, match="m3tfed serve"):
        spec.build(institutions={})
