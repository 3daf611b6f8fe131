"""Checkpoints: bitwise round trips, every kind of damage caught, crashes never half-write."""

from __future__ import annotations

import json
import os

import pytest
import torch
from m3tfed import CheckpointError
from m3tfed.federation import checkpoint as ckpt
from m3tfed.federation.checkpoint import (
    checkpoint_path,
    flatten_components,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    unflatten_components,
    write_json_atomic,
)


def bits(x: torch.Tensor) -> bytes:
    return bytes(x.contiguous().reshape(-1).view(torch.uint8).tolist())


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "expert.swiglu_0::w1": torch.randn(3, 4, generator=g),
        "router::w": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "head.grade::b": torch.randn(5, generator=g).to(torch.bfloat16),
        "trunk::half": torch.tensor([float("nan"), -0.0, 1e-8, float("inf")], dtype=torch.float16),
        "trunk::steps": torch.tensor(12345678901, dtype=torch.int64),  # 0-d
        "trunk::mask": torch.tensor([True, False, True]),
        "trunk::empty": torch.zeros(0, 3),
    }


def test_round_trip_is_bitwise(tmp_path):
    tensors = sample_tensors()
    meta = {"round": 3, "components": {"router": 2}, "metrics": [0.5, 0.25]}
    where = save_checkpoint(tmp_path / "ckpt", tensors, meta)
    assert where == tmp_path / "ckpt"
    assert sorted(p.name for p in where.iterdir()) == ["meta.json", "tensors.safetensors"]
    loaded, loaded_meta = load_checkpoint(where)
    assert loaded_meta == meta
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and loaded[k].shape == t.shape, k
        assert bits(loaded[k]) == bits(t), k
    record = json.loads((where / "meta.json").read_text())
    assert record["format_version"] == 1
    assert record["tensors_bytes"] == (where / "tensors.safetensors").stat().st_size
    assert len(record["tensors_sha256"]) == 64


def test_aliased_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(6.0)
    tensors = {"a": base, "b": base[:2], "c": base.reshape(2, 3).t()}
    save_checkpoint(tmp_path / "ckpt", tensors, {})
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t)


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"v": 1})
    save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(3)}, {"v": 2})
    tensors, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"v": 2} and torch.equal(tensors["w"], torch.zeros(3))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_unserialisable_meta_is_refused_before_writing(tmp_path):
    with pytest.raises(TypeError, match="meta is not JSON-serialisable"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(1)}, {"when": object()})
    assert list(tmp_path.iterdir()) == []


def test_truncated_tensors_file(tmp_path):
    where = save_checkpoint(tmp_path / "ckpt", sample_tensors(), {})
    data = (where / "tensors.safetensors").read_bytes()
    (where / "tensors.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"ckpt: tensors.safetensors is truncated: \d+ bytes"):
        load_checkpoint(where)


def test_flipped_byte_is_corrupt(tmp_path):
    where = save_checkpoint(tmp_path / "ckpt", sample_tensors(), {})
    path = where / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt: its sha256 does not match"):
        load_checkpoint(where)


def test_unparsable_safetensors_is_corrupt(tmp_path):
    where = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {})
    path = where / "tensors.safetensors"
    path.write_bytes(b"\xff" * 40)  # claims an enormous header
    record = json.loads((where / "meta.json").read_text())
    record.update(tensors_bytes=40, tensors_sha256=ckpt._sha256(path))  # hash now agrees
    (where / "meta.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="corrupt: safetensors cannot parse it"):
        load_checkpoint(where)


def test_missing_pieces(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: missing \(no such directory\)"):
        load_checkpoint(tmp_path / "nowhere")
    where = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {})
    (where / "tensors.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing tensors.safetensors"):
        load_checkpoint(where)
    (where / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt: missing meta.json \(the save never finished"):
        load_checkpoint(where)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda text, record: "{not json", "meta.json is not valid JSON"),
        (
            lambda text, record: json.dumps({**record, "format_version": 99}),
            r"unknown format version 99; this m3tfed reads version 1 \(upgrade",
        ),
        (
            lambda text, record: json.dumps({**record, "format": "other"}),
            "not an m3tfed checkpoint record",
        ),
        (
            lambda text, record: json.dumps(
                {k: v for k, v in record.items() if k != "tensors_sha256"}
            ),
            "lacks field 'tensors_sha256'",
        ),
    ],
)
def test_bad_meta_json(tmp_path, edit, match):
    where = save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {})
    text = (where / "meta.json").read_text()
    (where / "meta.json").write_text(edit(text, json.loads(text)))
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(where)


def _crash_on(monkeypatch, call_numbers: set[int]) -> None:
    """Make the given os.replace/os.rename calls (1-based, counted together) raise."""
    real_replace, real_rename, calls = os.replace, os.rename, [0]

    def wrap(real):
        def fake(src, dst, *args, **kwargs):
            calls[0] += 1
            if calls[0] in call_numbers:
                raise OSError("simulated crash")
            return real(src, dst, *args, **kwargs)

        return fake

    monkeypatch.setattr(os, "replace", wrap(real_replace))
    monkeypatch.setattr(os, "rename", wrap(real_rename))


@pytest.mark.parametrize("failing_call", [1, 2], ids=["moving-old-aside", "renaming-new-in"])
def test_crash_while_replacing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing_call):
    save_checkpoint(tmp_path / "ckpt", {"w": torch.ones(2)}, {"round": 1})
    _crash_on(monkeypatch, {failing_call})
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path / "ckpt", {"w": torch.zeros(2)}, {"round": 2})
    monkeypatch.undo()
    tensors, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta == {"round": 1} and torch.equal(tensors["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # temp dir cleaned up


def test_crash_on_first_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    _crash_on(monkeypatch, {1})
    with pytest.raises(OSError):
        save_checkpoint(checkpoint_path(tmp_path, 1), {"w": torch.ones(2)}, {})
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) is None
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_latest_checkpoint_skips_temp_and_broken(tmp_path, caplog):
    assert latest_checkpoint(tmp_path) is None  # no checkpoints folder yet
    for r in (1, 3, 4):
        save_checkpoint(
            checkpoint_path(tmp_path, r), {"w": torch.full((2,), float(r))}, {"round": r}
        )
    root = tmp_path / "checkpoints"
    assert checkpoint_path(tmp_path, 3) == root / "round_0003"
    # round 4 was damaged on disk; round 5 crashed before its rename (a temp dir with
    # a complete-looking payload); round 6 is a directory without meta.json
    damaged = root / "round_0004" / "tensors.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
    leftover = root / ".round_0005.tmp-abc123"
    leftover.mkdir()
    (leftover / "tensors.safetensors").write_bytes(b"partial")
    (root / "round_0006").mkdir()
    (root / "notes").mkdir()
    (root / "round_0009.txt").write_text("not a checkpoint")
    found = latest_checkpoint(tmp_path)
    assert found == root / "round_0003"
    assert load_checkpoint(found)[1] == {"round": 3}
    assert "round_0004" in caplog.text and "round_0006" in caplog.text


def test_write_json_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics" / "round.json"
    write_json_atomic(path, {"acc": 0.5})
    write_json_atomic(path, {"acc": 0.75, "rounds": [1, 2]})
    assert json.loads(path.read_text()) == {"acc": 0.75, "rounds": [1, 2]}
    _crash_on(monkeypatch, {1})
    with pytest.raises(OSError):
        write_json_atomic(path, {"acc": 0.0})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"acc": 0.75, "rounds": [1, 2]}
    assert [p.name for p in path.parent.iterdir()] == ["round.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"acc": 0.75, "rounds": [1, 2]}


def test_flatten_round_trip():
    a, b, c = torch.ones(1), torch.zeros(2), torch.arange(3)
    nested = {"expert.a": {"w": a, "b": b}, "router": {"layers.0.w": c}}
    flat = flatten_components(nested)
    assert list(flat) == ["expert.a::w", "expert.a::b", "router::layers.0.w"]
    assert flat["expert.a::w"] is a
    assert unflatten_components(flat) == nested
    with pytest.raises(ValueError, match="component name 'bad::name'"):
        flatten_components({"bad::name": {"w": a}})
    with pytest.raises(ValueError, match="key 'nosep' is not 'component::parameter'"):
        unflatten_components({"nosep": a})
