"""The Flower backend: wire format, bad replies, node state kept between messages, who
each institution is, private files, and a real deployment on 127.0.0.1.

The deployment tests share one deployment (module fixture): a SuperLink with TLS and
SuperNode authentication, the three institutions' SuperNodes (each with its warm
worker), and three intruders: a node with a registered key of an institution outside
the config that claims to be university, a node with a key nobody registered, and a
second node with rural_school's own key (the revocation test adds an institution and a
node of its own, so it needs no other test before it). Every process runs with its own
free ports and FLWR_HOME under tmp, telemetry off, and is stopped (by process group) at
the end of the module, also when a test fails. Secure aggregation on the wire is tested with the
ClientApp's own handlers and a fresh process state per message
(``RestartingGrid``), which is what a node does, at a fraction of the time.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import stat
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from conftest import tiny_config_dict
from flwr.app import Message
from m3tfed.federation.build import build_federation, build_institution, build_stages
from m3tfed.federation.checkpoint import checkpoint_path, load_checkpoint, write_bytes_atomic
from m3tfed.federation.config import load_config
from m3tfed.federation.lifecycle import resume_job, run_job
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
from m3tfed.plugins.backends.flower.identity import add_institution, key_folder, load_register
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


def config_dict(rounds: int = 3, privacy: bool = False, secagg: bool = True, **federation) -> dict:
    d = tiny_config_dict(rounds=rounds, n=24, **federation)
    d["institutions"] = [i for i in d["institutions"] if i["name"] in INSTITUTIONS]
    for inst in d["institutions"]:
        if privacy and inst["name"] in POLICIES:
            inst["policy"] = dict(POLICIES[inst["name"]])
            if not secagg:
                inst["policy"].pop("secure_aggregation", None)
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
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.ids.values())

    def push_messages(self, messages):
        ids = []
        for k, m in enumerate(messages):
            self.sent.append(m)
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
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert grid.kept[f"university/runs/{run_id}/stages/secagg.json"] == 0o600
    assert grid.kept[f"university/runs/{run_id}/privacy.json"] == 0o600
    assert not (tmp_path / "nodes" / "university" / "runs" / run_id / "stages" / "secagg.json").exists()
    # and everything a node keeps (personal parts, their round snapshots, accounts) too
    for name in INSTITUTIONS:
        state = tmp_path / "nodes" / name
        modes = {str(p.relative_to(state)): stat.S_IMODE(p.stat().st_mode) for p in [state, *state.rglob("*")]}
        assert {p: oct(m) for p, m in modes.items() if m != (0o700 if (state / p).is_dir() else 0o600)} == {}, name
    assert any(p.endswith("tensors.safetensors") for p in modes) or name != "math_academy"


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


def in_process_run(config: Path, runs_dir: Path, stop_after: int | None = None) -> Path:
    """The same federation with the in-process backend; with ``stop_after``, stopped
    after that round and resumed from its checkpoint, as the Flower run is: the two runs
    take exactly the same path, restart included."""
    with one_thread():
        run_job(config, name="in-process", runs_dir=runs_dir, stop_after=stop_after, progress=lambda _: None)
        if stop_after is not None:
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


# -- who each institution is ----------------------------------------------------------------
class ImpostorGrid(FakeGrid):
    """Five nodes: the three institutions (ids 100-102), guest's node (103) answering as
    university, and a stranger's node (104) answering as math_academy."""

    def __init__(self, fed):
        super().__init__({**fed.institutions, "guest": fed.institutions["university"], "stranger": fed.institutions["math_academy"]})


def test_discovery_binds_each_node_to_the_institution_of_its_key(caplog):
    cfg = load_config(config_dict(rounds=1, min_institutions=2))
    fed = build_federation(cfg)
    grid = ImpostorGrid(fed)
    identities = {"university": 100, "rural_school": 101, "math_academy": 102, "guest": 103}  # 104: nobody's key
    backend = FlowerBackend(grid, reply_grace_s=5.0, identities=identities)
    backend.discover(INSTITUTIONS, wait_s=5.0)
    assert backend.nodes == {"university": 100, "rural_school": 101, "math_academy": 102}
    assert "holds the key registered for institution 'guest' but says it is 'university' (impersonation)" in backend.refused[103]
    assert "its key is not registered for any institution" in backend.refused[104]
    assert sum("refused node 103" in r.message for r in caplog.records) == 1
    assert [m.metadata.dst_node_id for m in grid.sent] == [100, 101, 102, 103]  # the stranger is not even asked
    report = Server(cfg, fed.server.catalogue, backend).run_round(1)
    assert report.succeeded == sorted(INSTITUTIONS) and not report.dropped
    assert sorted(m.metadata.dst_node_id for m in grid.sent[4:]) == [100, 101, 102]  # the round: nothing to the refused
    # without registered keys (an insecure local deployment) a second node saying a taken
    # name is refused, and the run goes on with the first
    plain = FlowerBackend(ImpostorGrid(fed), reply_grace_s=5.0)
    plain.discover(INSTITUTIONS, wait_s=5.0)
    assert plain.nodes == {"university": 100, "rural_school": 101, "math_academy": 102}
    assert "which node 100 already is (duplicate name)" in plain.refused[103]
    assert "which node 102 already is (duplicate name)" in plain.refused[104]


def test_certs_keep_the_ca_private_and_usable_and_register_one_key_per_institution(tmp_path, capsys):
    from cryptography import x509
    from m3tfed.cli import main

    folder = tmp_path / "certs"
    assert main(["certs", str(folder), "--institution", "university", "--institution", "rural_school"]) == 0
    ca = (folder / "ca.crt").read_bytes()
    modes = {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}
    private = {".": 0o700, "ca.key": 0o600, "server.key": 0o600, "institutions/university/node.key": 0o600, "institutions/university": 0o700}
    assert {k: modes[k if k != "." else "."] for k in private if k != "."} == {k: v for k, v in private.items() if k != "."}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and modes["ca.crt"] == 0o644
    # later: one more institution, and a SuperLink certificate for another host, same CA
    assert main(["certs", str(folder), "--institution", "math_academy", "--host", "10.0.0.7"]) == 0
    assert (folder / "ca.crt").read_bytes() == ca
    cert = x509.load_pem_x509_certificate((folder / "server.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    register = load_register(folder)
    assert sorted(register) == ["math_academy", "rural_school", "university"]
    assert register["university"]["public_key"].startswith("ecdsa-sha2-nistp384 ")
    # a name has one key: a second one is refused until the first is revoked
    capsys.readouterr()
    assert main(["certs", str(folder), "--institution", "university"]) == 2
    assert "'university' already has a key" in capsys.readouterr().err
    assert main(["certs", str(folder), "--revoke", "university"]) == 0
    assert load_register(folder)["university"]["revoked"] and not (folder / "institutions" / "university" / "node.key").exists()
    assert main(["certs", str(folder), "--institution", "university"]) == 0
    assert load_register(folder)["university"]["public_key"] != register["university"]["public_key"]
    # an institution that made its own key sends only the public half; Flower needs a NIST curve
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    ssh = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    (tmp_path / "own.pub").write_bytes(ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(*ssh))
    (tmp_path / "ed.pub").write_bytes(ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(*ssh))
    assert main(["certs", str(folder), "--public-key", f"guest={tmp_path / 'own.pub'}"]) == 0
    assert load_register(folder)["guest"]["public_key"] == (tmp_path / "own.pub").read_text().strip()
    assert not (folder / "institutions" / "guest" / "node.key").exists()
    capsys.readouterr()
    assert main(["certs", str(folder), "--public-key", f"other={tmp_path / 'ed.pub'}"]) == 2
    assert "EC key on a NIST curve" in capsys.readouterr().err
    assert main(["certs", str(folder), "--public-key", f"again={tmp_path / 'own.pub'}"]) == 2
    assert "already registered for another institution" in capsys.readouterr().err


def test_the_serverapp_takes_paths_only_inside_the_folders_serve_gave_it(tmp_path, monkeypatch):
    from m3tfed.errors import ConfigError
    from m3tfed.plugins.backends.flower.deploy import ROOTS_ENV
    from m3tfed.plugins.backends.flower.server_app import allowed_roots, inside

    monkeypatch.delenv(ROOTS_ENV, raising=False)
    with pytest.raises(ConfigError, match="runs only on a SuperLink started by `m3tfed serve`"):
        allowed_roots()
    monkeypatch.setenv(ROOTS_ENV, f"{tmp_path / 'runs'}:{tmp_path / 'fed.toml'}")
    roots = allowed_roots()
    assert inside(tmp_path / "runs" / "a", roots, "run-dir") == (tmp_path / "runs" / "a").resolve()
    assert inside(tmp_path / "fed.toml", roots, "config") == (tmp_path / "fed.toml").resolve()
    for bad in (tmp_path / "other.toml", tmp_path / "runs" / ".." / "etc", "/etc/passwd"):
        with pytest.raises(ConfigError, match="outside the folders"):
            inside(bad, roots, "config")
    # the app's entry point checks before it touches the grid or the disk
    from flwr.app import Context, RecordDict
    from m3tfed.plugins.backends.flower import server_app

    run_config = {"config": str(tmp_path / "fed.toml"), "run-dir": "/tmp/elsewhere/run"}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError, match="run-config.run-dir: /tmp/elsewhere/run is outside"):
        server_app.main(None, context)
    assert not Path("/tmp/elsewhere").exists()


def test_serve_refuses_an_open_control_api_and_institutions_without_keys(tmp_path, capsys, monkeypatch):
    from m3tfed.cli import main

    monkeypatch.delenv("FLWR_OIDC_ENABLED", raising=False)
    config = tmp_path / "federation.toml"
    config.write_text(tomli_w.dumps(config_dict(rounds=1)))
    home = ["--home", str(tmp_path / "home"), "--runs-dir", str(tmp_path / "runs")]
    assert main(["serve", str(config), "--host", "0.0.0.0", *home]) == 2
    assert "would expose the SuperLink's control API" in capsys.readouterr().err
    make_certificates(tmp_path / "certs")
    add_institution(tmp_path / "certs", "university")
    assert main(["serve", str(config), "--certs", str(tmp_path / "certs"), *home]) == 2
    err = capsys.readouterr().err
    assert "no registered key for rural_school, math_academy" in err and "--institution rural_school --institution math_academy" in err
    assert not (tmp_path / "home" / "logs").exists()  # nothing was started
    # an institution joins with its key, or not at all (TLS)
    assert main(["join", str(config), "--institution", "university", "--superlink", "127.0.0.1:1", "--ca", str(tmp_path / "certs" / "ca.crt")]) == 2
    assert "--key node.key" in capsys.readouterr().err


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
    deadline = time.monotonic() + 60  # a guard: three shells start in milliseconds when idle

    def started() -> bool:  # all three exec'd: the third has called setsid (its own group) by then
        pids = descendants(proc.pid)
        return len(pids) == 3 and all(_comm(pid) == "sleep" for pid in pids)

    while not started() and time.monotonic() < deadline:
        time.sleep(0.05)
    helpers = descendants(proc.pid)
    assert len(helpers) == 3
    dep.kill("supernode-x")  # as a crash: the helpers are orphaned, still running
    assert all(_running(pid) for pid in helpers)
    dep.stop()
    assert not _still_running(helpers)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _still_running(pids, within: float = 60.0) -> list[int]:
    """The pids still running after ``within`` seconds (a SIGKILLed process takes a moment
    to go, longer on a busy machine): an empty list as soon as all are gone."""
    deadline = time.monotonic() + within
    while (alive := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


# -- a real deployment on loopback -----------------------------------------------------------
# Next to the three institutions: "guest", whose key is registered for the federation but
# who is not in this run's config. Its node claims to be university (an impersonation);
# a stranger's node with a key nobody registered claims math_academy; a second node
# with rural_school's own (copied) key tries to join while rural_school is online.
@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flower")
    certs = folder / "certs"
    make_certificates(certs)
    for name in [*INSTITUTIONS, "guest"]:
        add_institution(certs, name)
    stranger_key = folder / "stranger" / "node.key"
    write_bytes_atomic(stranger_key, _ssh_private_key(), private=True)
    dep = Deployment(folder / "home", certificates=load_or_make_certificates(certs), identities=certs, roots=[tmp_path_factory.getbasetemp()])
    started: list[int] = []
    try:
        dep.start_superlink()  # with SuperNode authentication: registers the four keys
        config = folder / "federation.toml"
        config.write_text(tomli_w.dumps(config_dict(rounds=2, privacy=True, secagg=False, min_institutions=2)))
        for name in INSTITUTIONS:
            dep.start_supernode(name, config)
        dep.start_supernode("university", config, private_key=key_folder(certs, "guest") / "node.key", name="supernode-impostor")
        _start_node_without_worker(dep, "math_academy", config, private_key=stranger_key, name="supernode-stranger")
        _wait_online(dep, [dep.node_ids[n] for n in [*INSTITUTIONS, "guest"]])
        _start_node_without_worker(dep, "rural_school", config, name="supernode-duplicate")
        started = [p.pid for p in dep.processes.values()]
        yield dep, config
    finally:
        spawned = [c for pid in started for c in descendants(pid)]
        dep.stop()
        # also the helpers of the node the kill test crashed (orphans, in its process group)
        alive = _still_running({*started, *spawned, *_members_of_groups(started)})
        assert not alive, f"processes left running: {alive}"


def _start_node_without_worker(dep: Deployment, *args, **kwargs) -> None:
    """A SuperNode that never gets a message (the SuperLink refuses it, or no run starts
    while it is up): no warm worker for it (a process that imports torch for nothing),
    Flower's own executor instead."""
    dep.warm = False
    try:
        dep.start_supernode(*args, **kwargs)
    finally:
        dep.warm = True


def _ssh_private_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())


def _node_status(dep: Deployment) -> dict[int, str]:
    out = dep.flwr("supernode", "list", "m3tfed", "--format", "json")
    return {int(n["node-id"]): n["status"] for n in json.loads(out[out.index("{"):])["nodes"]}


def _wait_online(dep: Deployment, nodes: list[int], timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _node_status(dep)
        if all(status.get(n) == "online" for n in nodes):
            return
        time.sleep(0.5)
    raise AssertionError(f"nodes {nodes} not all online within {timeout}s: {_node_status(dep)}")


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
    # generous: every message may start a process (a few seconds on a busy 2-core machine)
    done = dep.run(config, run_dir, timeout=900, wait_nodes_s=90.0, **run_config)
    out = run_dir / "flower.json"
    assert out.exists(), f"flwr run exited {done.returncode} without a result; see {dep.folder / 'logs'}"
    return json.loads(out.read_text())


def test_only_registered_institutions_take_part_and_finish_as_the_in_process_run(deployment, tmp_path):
    dep, config = deployment
    run_dir = tmp_path / "run"
    out = _flower_run(dep, config, run_dir)
    assert out["done"] and out["last_round"] == 2
    # the impersonation is refused by the coordinator: guest's node says it is university
    guest = dep.node_ids["guest"]
    assert "holds the key registered for institution 'guest' but says it is 'university'" in out["refused"][str(guest)]
    assert sorted(out["refused"]) == [str(guest)], out["refused"]  # nobody else got that far
    assert f"refused node {guest}" in (dep.folder / "logs" / "flwr-run.log").read_text(errors="replace")
    # the stranger's key and the copy of rural_school's key never got past the SuperLink
    status = _node_status(dep)
    assert sorted(n for n, s in status.items() if s == "online") == sorted(dep.node_ids.values())
    assert "Invalid SuperNode authentication" in _log(dep, "stranger") or "activat" in _log(dep, "stranger").lower()
    assert "activat" in _log(dep, "duplicate").lower()
    caps = json.loads((run_dir / "capabilities.json").read_text())
    assert sorted(caps) == sorted(INSTITUTIONS)  # no "excluded": every node's policy is the config's
    assert caps["math_academy"]["personal"] == ["task.symbol"] and caps["university"]["policy"]["dp"] == "local"
    # the genuine institutions' weights, contributors and the ledger's epsilon per round
    # equal the in-process run's (the nodes' accountants carried over between messages;
    # resuming on the wire: test_secagg_and_dp_state_survive_a_new_clientapp_process_per_message)
    assert_same_run(run_dir, in_process_run(config, tmp_path / "runs"), rounds=2)
    # what the institutions keep (personal parts, privacy accounts) is theirs alone
    for name in INSTITUTIONS:
        state = dep.folder / "nodes" / name / "state"
        modes = {str(p.relative_to(state)): stat.S_IMODE(p.stat().st_mode) for p in [state, *state.rglob("*")]}
        assert {p: m for p, m in modes.items() if m != (0o700 if (state / p).is_dir() else 0o600)} == {}, name
    kept = {p.name for p in (dep.folder / "nodes").rglob("*") if p.is_file()}
    assert {"tensors.safetensors", "privacy.json"} <= kept
    assert stat.S_IMODE(dep.nodes_file.stat().st_mode) == 0o600


def _log(dep: Deployment, node: str) -> str:
    return (dep.folder / "logs" / f"supernode-{node}.log").read_text(errors="replace")


def test_a_supernode_killed_mid_round_is_dropped_after_its_timeout_and_the_run_goes_on(deployment, tmp_path):
    dep, node_config = deployment
    # Without the privacy policies, to keep this test short. The nodes read their config
    # file at every message, so this run's federation is the plain one, on both sides.
    plain = tomli_w.dumps(config_dict(rounds=1, min_institutions=2, timeout_s=20.0))
    config = tmp_path / "short.toml"
    config.write_text(plain)
    run_dir = tmp_path / "faulty"
    with_privacy = node_config.read_text()
    node_config.write_text(plain)
    log = dep.folder / "logs" / "supernode-rural_school.log"
    before = log.read_text(errors="replace").count("Receiving: train message")

    import threading

    killed, run_over = threading.Event(), threading.Event()

    def kill_when_training_starts():
        # no deadline of its own: it watches for as long as the run goes (the run's timeout
        # guards against a hang), and polls often so the node dies before it can reply
        while not run_over.is_set():
            if log.read_text(errors="replace").count("Receiving: train message") > before:
                dep.kill("supernode-rural_school")
                killed.set()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_when_training_starts, daemon=True)
    watcher.start()
    try:
        out = _flower_run(dep, config, run_dir, reply_grace_s=5.0)
    finally:
        run_over.set()
        node_config.write_text(with_privacy)
    watcher.join()
    assert killed.is_set(), "the node never received its training message"
    (first,) = out["history"]
    assert "no reply within 25s" in first["dropped"]["rural_school"]
    # the run goes on: the round aggregates what the two nodes left sent, and is saved
    assert out["done"] and first["succeeded"] == ["math_academy", "university"]
    assert all("rural_school" not in names for names in first["contributors"].values())
    assert first["contributors"]["trunk"] == ["math_academy", "university"]
    assert checkpoint_path(run_dir, 1).exists()


def test_a_revoked_institution_cannot_reconnect(deployment):
    # Its own institution, so it depends on no other test's nodes and leaves them as they
    # are: "transfer_school" gets a key, its node joins, and its node goes down.
    dep, config = deployment
    add_institution(dep.identities, "transfer_school")
    node = dep.register_nodes()["transfer_school"]
    _start_node_without_worker(dep, "transfer_school", config)
    _wait_online(dep, [node])
    dep.stop_process("supernode-transfer_school")
    key = key_folder(dep.identities, "transfer_school") / "node.key"
    kept = Path(shutil.copy(key, dep.folder / "transfer_school.key"))
    dep.revoke("transfer_school")
    assert _node_status(dep).get(node) not in ("online", "offline", "registered")
    assert load_register(dep.identities)["transfer_school"]["revoked"]
    assert not (key_folder(dep.identities, "transfer_school") / "node.key").exists()
    assert "transfer_school" not in json.loads(dep.nodes_file.read_text())
    # the institution restarts its SuperNode with the key it still has: refused
    log = dep.folder / "logs" / "supernode-transfer_school.log"
    seen = len(log.read_text(errors="replace"))
    _start_node_without_worker(dep, "transfer_school", config, private_key=kept)
    deadline = time.monotonic() + 300  # a guard against a hang: it returns once refused
    while "activat" not in log.read_text(errors="replace")[seen:].lower() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "activat" in log.read_text(errors="replace")[seen:].lower()
    online = {n for n, s in _node_status(dep).items() if s == "online"}
    assert node not in online and online <= set(dep.node_ids.values())


def test_flower_bench_smoke_prints_where_a_message_goes(tmp_path):
    import os
    import subprocess
    import sys

    bench = Path(__file__).parent.parent / "bench" / "flower_backend.py"
    done = subprocess.run([sys.executable, str(bench), "--smoke"], capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    parts = out["cold_message_s"]
    assert set(parts) == {"process_start_s", "flower_imports_s", "m3tfed_torch_imports_s", "build_institution_s", "train_s"}
    assert all(v > 0 for v in parts.values()) and out["cold_message_total_s"] == pytest.approx(sum(parts.values()))


def test_flower_backend_is_a_registered_plugin_that_explains_where_it_runs():
    spec = get_catalogue().get("backend", "flower")
    with pytest.raises(Exception, match="m3tfed serve"):
        spec.build(institutions={})
