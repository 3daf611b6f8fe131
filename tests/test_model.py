import pytest
import torch
from m3tfed import ContractError, EncoderSpec, ModalityEncoder, Tokens, hookimpl
from m3tfed.data import model_inputs, take
from m3tfed.defaults import default_config_dict
from m3tfed.federation.config import load_config
from m3tfed.model import M3TModel, component_of
from m3tfed.plugin_manager import catalogue_from
from m3tfed.plugins.data.synthetic import SyntheticEducation
from torch import nn


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(None)
    data = SyntheticEducation({"community_college": {"n": 24, "modality_dropout": 0.5}}).load([cfg.institutions[4]], seed=0)
    return cfg, data["community_college"]


def test_forward_every_task_and_component_names(setup):
    cfg, data = setup
    torch.manual_seed(0)
    model = M3TModel(cfg.model, modalities=["tabular", "interactions", "text"], tasks=["grade", "dropout", "essay_score"])
    model.wide_stats = model.wide_statistics(data.train)  # the essays' term scales by its institution's
    batch = take(data.train, torch.arange(8))
    shapes = {t: tuple(model(model_inputs(batch), t).pred.shape) for t in ["grade", "dropout", "essay_score"]}
    assert shapes == {"grade": (8,), "dropout": (8, 2), "essay_score": (8, 2)}
    comps = model.component_names()
    assert {"trunk", "router", "encoder.text", "task.grade", "expert.general_0", "expert.small_1"} <= set(comps)
    assert "encoder.image" not in comps and "task.symbol" not in comps
    assert component_of("layers.1.moe.experts.text_0.up.weight") == "expert.text_0"
    assert component_of("layers.0.moe.router.proj.weight") == "router"
    assert component_of("layers.0.attn.qkv.weight") == "trunk"
    # component states partition the trainable parameters exactly
    n_comp = sum(t.numel() for c in comps for t in model.component_state(c).values())
    assert n_comp == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_unselected_experts_are_not_built_and_get_no_tokens(setup):
    cfg, data = setup
    model = M3TModel(cfg.model, modalities=["tabular"], tasks=["grade"], experts=["small_0", "tabular_0"])
    names = {n.split(".")[4] for n, _ in model.named_parameters() if ".experts." in n}
    assert names == {"small_0", "tabular_0"}
    out = model(model_inputs(take(data.train, torch.arange(min(16, data.num_train)))), "grade")
    used = {model.expert_names[i] for i, c in enumerate(out.tokens_per_expert.tolist()) if c}
    assert used and used <= {"small_0", "tabular_0"}
    assert out.aux_loss.item() > 0


def test_eval_counts_each_modalitys_tokens_per_expert(setup):
    cfg, data = setup
    torch.manual_seed(0)
    mods = ["tabular", "interactions", "text"]
    model = M3TModel(cfg.model, modalities=mods, tasks=["grade"]).eval()
    batch = model_inputs(take(data.train, torch.arange(8)))
    assert not all(p.all() for p in batch["present"].values())  # some samples lack a modality
    with torch.no_grad():
        out = model(batch, "grade")
        valid = {}  # real tokens of each modality: the encoder's mask and the sample's presence
        for m in mods:
            _, mask = model.encoders[m](batch[m])
            valid[m] = int((mask & batch["present"][m].bool().unsqueeze(1)).sum()) if m in batch["present"] else int(mask.sum())
    assert list(out.tokens_per_modality) == mods
    k, layers = cfg.model.router.options["k"], cfg.model.n_layers  # eval: topk drops nothing
    assert {m: int(c.sum()) for m, c in out.tokens_per_modality.items()} == {m: v * k * layers for m, v in valid.items()}
    # the rest of the assignments are the task tokens', one per sample
    assert int(out.tokens_per_expert.sum()) == (8 + sum(valid.values())) * k * layers
    assert sum(out.tokens_per_modality.values()).le(out.tokens_per_expert).all()
    assert model.train()(batch, "grade").tokens_per_modality == {}  # training skips it


def test_route_by_modality_keeps_each_modalitys_tokens_on_its_experts(setup):
    cfg, data = setup
    torch.manual_seed(0)
    assert cfg.model.route_by_modality  # the default
    model = M3TModel(cfg.model, modalities=["tabular", "interactions", "text"], tasks=["grade"]).eval()
    tags = {e.name: set(e.modalities) for e in cfg.model.experts}
    with torch.no_grad():
        out = model(model_inputs(take(data.train, torch.arange(8))), "grade")
    specialists_used = set()
    for m, counts in out.tokens_per_modality.items():
        used = {model.expert_names[i] for i, c in enumerate(counts.tolist()) if c}
        assert used and all(not tags[e] or m in tags[e] for e in used), (m, used)
        specialists_used |= {e for e in used if tags[e]}
    assert len(specialists_used) >= 3  # the tabular, logs and text specialists serve their own


def test_a_missing_modality_does_not_influence_that_sample(setup):
    cfg, data = setup
    torch.manual_seed(0)
    model = M3TModel(cfg.model, modalities=["tabular", "text"], tasks=["grade"]).eval()
    batch = model_inputs(take(data.train, torch.arange(4)))
    batch["present"] = {"text": torch.tensor([True, False, True, True])}
    base = model(batch, "grade").pred
    changed = dict(batch)
    changed["text"] = list(batch["text"])
    changed["text"][1] = "completely different words here " * 5
    after = model(changed, "grade").pred
    assert torch.allclose(base[1], after[1], atol=1e-6)
    # ...while a sample that has the modality does react to it
    changed["text"][0] = "completely different words here " * 5
    assert not torch.allclose(model(changed, "grade").pred[0], base[0])


class WrongWidthEncoder(ModalityEncoder):
    modality = "tabular"

    def __init__(self, d_model):
        super().__init__()
        self.proj = nn.Linear(6, d_model + 1)

    def forward(self, inputs):
        x = self.proj(torch.nan_to_num(inputs["numeric"])).unsqueeze(1)
        return Tokens(x, torch.ones(x.shape[:2], dtype=torch.bool))

    def example_input(self, batch_size, generator=None):
        return {"numeric": torch.randn(batch_size, 6, generator=generator)}


class BadPlugin:
    __name__ = "bad_encoder_pkg"

    @hookimpl
    def register_encoders(self, register):
        register(EncoderSpec(name="wrong_width", build=WrongWidthEncoder, version="1", license="MIT", modality="tabular"))


def test_an_encoder_with_the_wrong_output_width_is_named(setup):
    cfg, data = setup
    cat = catalogue_from([BadPlugin()])
    d = default_config_dict()
    d["model"]["encoders"]["tabular"] = {"plugin": "wrong_width"}
    bad = load_config(d)
    with pytest.raises(ContractError) as err:
        model = M3TModel(bad.model, modalities=["tabular"], tasks=["grade"], catalogue=cat)
        model(model_inputs(take(data.train, torch.arange(2))), "grade")
    msg = str(err.value)
    assert "wrong_width" in msg and "bad_encoder_pkg" in msg and "33" in msg and "32" in msg
