import torch
from conftest import tiny_config_dict
from m3tfed import UpdateStageSpec, hookimpl
from m3tfed.federation.aggregation import ComponentUpdate
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config
from m3tfed.plugin_manager import catalogue_from
from m3tfed.plugins.pipeline import ClipUpdates, HalfPrecision


def update(values, name="a"):
    return ComponentUpdate(name, "expert.x", {"w": torch.tensor(values)}, 1.0)


def test_clip_scales_to_the_norm_and_leaves_small_updates():
    big, small = ClipUpdates(max_norm=1.0).process([update([3.0, 4.0]), update([0.3, 0.4])], {})
    assert torch.allclose(big.delta["w"], torch.tensor([0.6, 0.8]))
    assert torch.equal(small.delta["w"], torch.tensor([0.3, 0.4]))


def test_fp16_halves_the_bytes():
    (u,) = HalfPrecision().process([update([1.0, 2.0])], {})
    assert u.delta["w"].dtype == torch.float16 and u.delta["w"].element_size() == 2


class Recorder:
    """A third-party stage on the server side: sees every update before aggregation."""

    side = "server"
    seen: list = []

    def process(self, updates, context):
        Recorder.seen.append((context["round"], sorted({u.institution for u in updates})))
        return updates


class RecorderPlugin:
    __name__ = "recorder_pkg"

    @hookimpl
    def register_update_stages(self, register):
        register(UpdateStageSpec(name="recorder", build=Recorder, version="1", license="MIT"))


def test_pipeline_runs_institution_and_server_stages_in_a_round():
    d = tiny_config_dict(pipeline=[{"plugin": "clip", "options": {"max_norm": 0.01}}, {"plugin": "recorder"}])
    fed = build_federation(load_config(d), catalogue=catalogue_from([RecorderPlugin()]))
    captured = []
    agg = fed.server.aggregators["trunk"]
    original = agg.aggregate

    def spy(component, current, updates):
        captured.extend(updates)
        return original(component, current, updates)

    agg.aggregate = spy
    fed.server.run_round(1)
    assert Recorder.seen == [(1, sorted(fed.institutions))]
    norms = [float(torch.sqrt(sum(v.pow(2).sum() for v in u.delta.values()))) for u in captured]
    assert len(norms) == 6 and max(norms) <= 0.01 + 1e-6  # clipped before leaving each institution


def test_fp16_updates_aggregate_into_float32_state():
    fed = build_federation(load_config(tiny_config_dict(pipeline=[{"plugin": "fp16"}])))
    fed.server.run_round(1)
    assert all(v.dtype == torch.float32 for s in fed.server.state.values() for v in s.values())
    ups = [e for e in fed.server.backend.transcript if e["direction"] == "up"]
    downs = [e for e in fed.server.backend.transcript if e["direction"] == "down"]
    # upload of the same components costs half the bytes of the download
    hs_up = next(e for e in ups if e["institution"] == "high_school")
    assert hs_up["bytes"] < next(e for e in downs if e["institution"] == "high_school")["bytes"] * 0.55
