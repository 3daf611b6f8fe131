"""The wide term of a task head (``model.tasks.<t>.wide``): a linear map from an encoder's
raw features to the head's output, added to it (wide and deep)."""

import math

import pytest
import torch
from m3tfed import ConfigError, ContractError, EncoderSpec, ModalityEncoder, Tokens, hookimpl
from m3tfed.config import from_dict
from m3tfed.contracts import check_encoder_module, check_task_module
from m3tfed.model import M3TModel, ModelConfig, PluginConfig, TaskConfig
from m3tfed.plugin_manager import catalogue_from, get_catalogue
from m3tfed.plugins.encoders.image import ImageEncoder
from m3tfed.plugins.encoders.sequence import InteractionEncoder
from m3tfed.plugins.encoders.tabular import TabularEncoder
from m3tfed.plugins.encoders.text import TextEncoder
from torch import nn


def config(**tasks) -> ModelConfig:
    cfg = from_dict(
        ModelConfig,
        {
            "d_model": 16,
            "n_heads": 2,
            "n_layers": 1,
            "encoders": {
                "tabular": {"plugin": "tabular", "options": {"n_numeric": 2, "cardinalities": [3]}},
                "image": {"plugin": "image", "options": {"image_size": 8, "patch_size": 4}},
                "interactions": {"plugin": "sequence", "options": {"num_skills": 4, "max_len": 4}},
            },
            "experts": [{"name": "a", "options": {"hidden": 16}}],
            "tasks": tasks,
        },
        "model",
    )
    cfg.validate()
    return cfg


def test_tabular_wide_features_are_numbers_missing_indicators_and_one_hot_categories():
    enc = TabularEncoder(8, n_numeric=2, cardinalities=(3, 2))
    rows = {"numeric": torch.tensor([[1.5, float("nan")], [-2.0, 0.25]]), "categorical": torch.tensor([[2, -1], [0, 1]])}
    # numbers (NaN -> 0) | missing | column 0: missing, 0, 1, 2 | column 1: missing, 0, 1
    expected = torch.tensor(
        [
            [1.5, 0.0, 0, 1, 0, 0, 0, 1, 1, 0, 0],
            [-2.0, 0.25, 0, 0, 0, 1, 0, 0, 0, 0, 1],
        ]
    )
    assert enc.wide_width == 11
    assert torch.equal(enc.wide_features(rows), expected)


def test_image_wide_features_are_the_pixels_with_a_small_image_padded_in_place():
    enc = ImageEncoder(8, image_size=8, patch_size=4)
    small = torch.arange(16.0).reshape(1, 1, 4, 4)
    feats = enc.wide_features(small)
    assert enc.wide_width == 64 and feats.shape == (1, 64)
    grid = feats.reshape(8, 8)
    assert torch.equal(grid[:4, :4], small[0, 0]) and grid[4:].abs().sum() == 0 and grid[:, 4:].abs().sum() == 0


def test_image_wide_size_keeps_only_the_pixels_a_source_has():
    enc = ImageEncoder(8, image_size=8, patch_size=4, wide_size=[4, 8])
    assert enc.example_input(2).shape == (2, 1, 4, 8)  # the contract check's images fit
    wide = enc.wide_features(torch.arange(16.0).reshape(1, 1, 4, 4))
    assert enc.wide_width == 32 and torch.equal(wide.reshape(4, 8)[:, :4], torch.arange(16.0).reshape(4, 4))
    with pytest.raises(ValueError, match="larger than wide_size 4 x 8"):
        enc.wide_features(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="wide_size must be"):
        ImageEncoder(8, image_size=8, patch_size=4, wide_size=[16, 8])


def test_text_wide_features_are_length_and_vocabulary():
    enc = TextEncoder(8)
    feats = enc.wide_features(["the cat saw the dog", ""])
    # log(1 + 19 characters), log(1 + 5 words), 15 / 5 letters per word, 4 distinct / 5
    expected = torch.tensor([[math.log(20), math.log(6), 3.0, 0.8], [0.0, 0.0, 0.0, 0.0]])
    assert enc.wide_width == 4 and torch.allclose(feats, expected)
    with pytest.raises(ValueError, match="token ids"):
        enc.wide_features(enc.tokenize(["the cat"]))


def test_interaction_wide_features_count_successes_and_failures_per_skill():
    enc = InteractionEncoder(8, num_skills=3, max_len=8)
    logs = {
        "skill": torch.tensor([[0, 1, 0, 2, 0, 0], [1, 1, 2, 0, 0, 0]]),
        "correct": torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]]),
        # the second student's first two steps are padding
        "mask": torch.tensor([[True] * 6, [False, False, True, True, True, True]]),
        "query_skill": torch.tensor([0, 2]),
    }
    ln = torch.log1p
    t = torch.tensor
    # per skill log(1 + successes) | log(1 + failures) | query one-hot | the query's
    # successes | its failures | share correct overall | over the last 5 | log(1 + answers)
    expected = torch.stack(
        [
            torch.cat([ln(t([2.0, 0, 1])), ln(t([2.0, 1, 0])), t([1.0, 0, 0]), ln(t([2.0, 0, 0])), ln(t([2.0, 0, 0])), t([3 / 6, 2 / 5]), ln(t([6.0]))]),
            torch.cat([ln(t([0.0, 0, 1])), ln(t([3.0, 0, 0])), t([0.0, 0, 1]), ln(t([0.0, 0, 1])), t([0.0, 0, 0]), t([1 / 4, 1 / 4]), ln(t([4.0]))]),
        ]
    )
    assert enc.wide_width == 18
    assert torch.allclose(enc.wide_features(logs), expected)
    # A next question's id adds its one-hot; without a query those parts stay zero.
    with_ids = InteractionEncoder(8, num_skills=3, max_len=8, num_questions=4)
    feats = with_ids.wide_features({**logs, "query_question": torch.tensor([3, 1])})
    assert with_ids.wide_width == 22 and torch.equal(feats[:, 18:], t([[0.0, 0, 0, 1], [0, 1, 0, 0]]))
    no_query = enc.wide_features({k: v for k, v in logs.items() if k != "query_skill"})
    assert no_query[:, 6:15].abs().sum() == 0 and torch.allclose(no_query[:, :6], expected[:, :6])


def test_the_wide_term_starts_at_zero_belongs_to_the_task_and_has_the_same_keys_everywhere():
    cfg = config(score={"plugin": "regression", "wide": ["tabular", "image"]}, kind={"plugin": "classification", "options": {"num_classes": 3}})
    torch.manual_seed(0)
    full = M3TModel(cfg)
    shapes = {n: tuple(p.shape) for n, p in full.named_parameters() if ".wide." in n}
    assert shapes == {"tasks.score.wide.tabular.weight": (1, 8), "tasks.score.wide.image.weight": (1, 64)}
    assert set(shapes) <= set(full.component_state("task.score"))
    # An institution without images still holds the image map of a shared head.
    tab_only = M3TModel(cfg, modalities=["tabular"])
    assert set(tab_only.component_state("task.score")) == set(full.component_state("task.score"))

    batch = {"tabular": full.encoders["tabular"].encoder.example_input(4)}
    before = full(batch, "score").pred
    with torch.no_grad():
        for p in full.tasks["score"].wide.parameters():
            p.zero_()
        full.tasks["score"].wide["tabular"].weight[0, 0] = 2.0
    after = full(batch, "score").pred
    # The term is linear in the raw features: pred moves by 2 * (first numeric column).
    assert torch.allclose(after - before, 2.0 * torch.nan_to_num(batch["tabular"]["numeric"][:, 0]), atol=1e-6)


def test_adding_a_wide_term_changes_no_other_initial_weight():
    torch.manual_seed(3)
    plain = M3TModel(config(score={"plugin": "regression"}, kind={"plugin": "classification"}))
    torch.manual_seed(3)
    wide = M3TModel(config(score={"plugin": "regression", "wide": ["tabular", "image"]}, kind={"plugin": "classification"}))
    theirs = dict(wide.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in plain.named_parameters())
    assert set(theirs) - dict(plain.named_parameters()).keys() == {"tasks.score.wide.tabular.weight", "tasks.score.wide.image.weight"}


def test_a_sample_without_the_modality_gets_no_wide_term():
    cfg = config(score={"plugin": "regression", "wide": ["image"]})
    torch.manual_seed(0)
    model = M3TModel(cfg, modalities=["tabular", "image"]).eval()
    images = torch.rand(3, 1, 8, 8)
    batch = {"tabular": model.encoders["tabular"].encoder.example_input(3), "image": images, "present": {"image": torch.tensor([True, False, True])}}
    base = model(batch, "score").pred
    with torch.no_grad():
        model.tasks["score"].wide["image"].weight.fill_(1.0)
    moved = model(batch, "score").pred - base
    assert moved[1].abs() < 1e-6
    assert torch.allclose(moved[[0, 2]], images[[0, 2]].flatten(1).sum(1), atol=1e-4)


def test_the_wide_term_learns_which_pixel_carries_the_target():
    """The target is one pixel's value (a stroke at one place): trained with the rest of
    the model, the wide weight of that pixel grows above all others and the loss on new
    images falls. (Whether the term helps on real data is measured on validation:
    docs/results.md, "Learning quality" 9.)"""
    torch.manual_seed(0)

    def rows(n):
        images = torch.rand(n, 1, 8, 8)
        return {"image": images}, 4 * images[:, 0, 2, 5]

    (train, y), (test, y_test) = rows(96), rows(256)
    torch.manual_seed(1)
    model = M3TModel(config(score={"plugin": "regression", "wide": ["image"]}), modalities=["image"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(model.loss(test, "score", y_test)[0])
    for _ in range(60):
        loss, _ = model.loss(train, "score", y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model.loss(test, "score", y_test)[0])
    w = model.tasks["score"].wide["image"].weight[0]
    assert int(w.argmax()) == 2 * 8 + 5 and w[2 * 8 + 5] > 2 * w.abs().median(), w
    assert after < 0.5 * before, (before, after)


class NoWideEncoder(ModalityEncoder):
    modality = "tabular"

    def __init__(self, d_model):
        super().__init__()
        self.proj = nn.Linear(2, d_model)

    def forward(self, inputs):
        x = self.proj(inputs).unsqueeze(1)
        return Tokens(x, torch.ones(x.shape[:2], dtype=torch.bool))

    def example_input(self, batch_size, generator=None):
        return torch.randn(batch_size, 2, generator=generator)


class NoWideSequence(NoWideEncoder):
    """An interaction-log encoder that offers no wide features."""

    modality = "interactions"


class NoWidePlugin:
    __name__ = "no_wide_pkg"

    @hookimpl
    def register_encoders(self, register):
        register(EncoderSpec(name="no_wide", build=NoWideEncoder, version="1", license="MIT", modality="tabular"))
        register(EncoderSpec(name="no_wide_sequence", build=NoWideSequence, version="1", license="MIT", modality="interactions"))


def test_a_wide_modality_must_be_an_encoder_that_offers_wide_features():
    with pytest.raises(ConfigError, match=r"model\.tasks\.score\.wide: 'essays' is not in model\.encoders"):
        config(score={"plugin": "regression", "wide": ["essays"]})
    cfg = config(score={"plugin": "regression", "wide": ["tabular"]})
    cfg.encoders["tabular"] = PluginConfig("no_wide")
    with pytest.raises(ConfigError, match=r"model\.tasks\.score\.wide: encoder plugin 'no_wide' of 'tabular' offers no wide features"):
        M3TModel(cfg, modalities=["tabular"], catalogue=catalogue_from([NoWidePlugin()]))


def test_a_head_s_declared_output_shape_sizes_the_term_and_must_be_true():
    cfg = config(kind={"plugin": "classification", "options": {"num_classes": 3}, "wide": ["tabular"]})
    # Built without running the head (a ZeRO-3 rank): the declared shape sizes the term.
    blind = M3TModel(cfg, modalities=["tabular"], check_contracts=False)
    assert blind.tasks["kind"].head.output_shape == (3,) and blind.tasks["kind"].wide["tabular"].weight.shape == (3, 8)
    slot = M3TModel(cfg, modalities=["tabular"]).tasks["kind"]
    slot.head.output_shape = (4,)
    with pytest.raises(ContractError, match=r"output_shape is \(4,\) but the prediction is \[3, 3\]"):
        check_task_module(get_catalogue().get("task", "classification"), slot.head, 16)
    slot.head.output_shape = None
    with pytest.raises(ConfigError, match=r"model\.tasks\.kind\.wide: task plugin 'classification' declares no output_shape"):
        slot.add_wide("tabular", 8, 16, "model.tasks.kind.wide", can_run=False)
    slot.add_wide("image", 64, 16, "model.tasks.kind.wide", can_run=True)  # measured by a forward instead
    assert slot.wide["image"].weight.shape == (3, 64)


class OffByOne(TabularEncoder):
    wide_width = 9  # the features are 8 wide


def test_the_contract_check_holds_an_encoder_to_its_wide_width():
    spec = get_catalogue().get("encoder", "tabular")
    check_encoder_module(spec, TabularEncoder(16, n_numeric=2, cardinalities=(3,)), 16)
    with pytest.raises(ContractError, match=r"wide_features must return a float \[B, wide_width\] = \[2, 9\] tensor, got \[2, 8\]"):
        check_encoder_module(spec, OffByOne(16, n_numeric=2, cardinalities=(3,)), 16)


def test_a_task_given_as_a_plugin_config_takes_its_plugin_s_default_wide_term():
    cfg = config(score={"plugin": "regression"})
    api = ModelConfig(d_model=16, n_heads=2, n_layers=1, encoders=cfg.encoders, experts=cfg.experts, tasks={"score": PluginConfig("regression")})
    assert isinstance(api.tasks["score"], TaskConfig) and api.tasks["score"].wide is None
    assert len(M3TModel(api, modalities=["tabular"]).tasks["score"].wide) == 0  # regression declares none


def test_next_response_reads_the_log_s_wide_features_unless_told_otherwise():
    """Its plugin's default (``TaskSpec.wide``): a logistic model of the log beside the
    deep head where the log's encoder offers one; ``wide = []`` turns it off, and an
    encoder without wide features leaves the default term out instead of failing."""
    assert get_catalogue().get("task", "next_response").wide == ("interactions",)
    default = M3TModel(config(nr={"plugin": "next_response"}), modalities=["interactions"])
    assert list(default.tasks["nr"].wide) == ["interactions"]
    assert default.tasks["nr"].wide["interactions"].in_features == InteractionEncoder(16, num_skills=4, max_len=4).wide_width
    assert len(M3TModel(config(nr={"plugin": "next_response", "wide": []}), modalities=["interactions"]).tasks["nr"].wide) == 0
    cfg = config(nr={"plugin": "next_response"})
    cfg.encoders["interactions"] = PluginConfig("no_wide_sequence")
    model = M3TModel(cfg, modalities=["interactions"], catalogue=catalogue_from([NoWidePlugin()]))
    assert len(model.tasks["nr"].wide) == 0
    # a term the config asks for still fails there, also after a task whose default was skipped
    cfg = config(nr={"plugin": "next_response"}, asked={"plugin": "next_response", "wide": ["interactions"]})
    cfg.encoders["interactions"] = PluginConfig("no_wide_sequence")
    with pytest.raises(ConfigError, match=r"model\.tasks\.asked\.wide: encoder plugin 'no_wide_sequence' of 'interactions' offers no wide features"):
        M3TModel(cfg, modalities=["interactions"], catalogue=catalogue_from([NoWidePlugin()]))


# -- how the term learns (wide_fit) and what it reads (wide_scale) ---------------------
def _grads(model, batch, y):
    loss, _ = model.loss(batch, "score", y)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads) if g is not None}


def test_a_residual_wide_term_leaves_the_deep_head_learning_as_without_it():
    """``wide_fit = "residual"``: every deep parameter's gradient is the one of the same
    model with no term; the term's own gradient is the joint fit's (the sum's loss), so
    it learns the deep head's residual. Jointly fitted, the deep gradients move."""
    torch.manual_seed(0)
    batch = {"tabular": M3TModel(config(score={"plugin": "regression"})).encoders["tabular"].encoder.example_input(8, torch.Generator().manual_seed(1))}
    y = torch.randn(8, generator=torch.Generator().manual_seed(2))
    grads = {}
    for fit in (None, "joint", "residual"):
        torch.manual_seed(3)
        task = {"plugin": "regression"} if fit is None else {"plugin": "regression", "wide": ["tabular"], "wide_fit": fit}
        model = M3TModel(config(score=task), modalities=["tabular"])
        if fit is not None:
            with torch.no_grad():  # a term that already predicts something
                model.tasks["score"].wide["tabular"].weight.copy_(torch.linspace(-1, 1, 8))
        grads[fit] = _grads(model, batch, y)
    term = "tasks.score.wide.tabular.weight"
    plain, joint, residual = grads[None], grads["joint"], grads["residual"]
    assert set(residual) == set(plain) | {term}
    assert all(torch.equal(residual[n], g) for n, g in plain.items())  # exactly, not to rounding
    assert not all(torch.allclose(joint[n], g, atol=1e-6) for n, g in plain.items())
    assert torch.allclose(residual[term], joint[term], atol=1e-6) and float(residual[term].abs().max()) > 0
    # the loss it reports (training curves, q-FFL's weights) is the prediction's, as joint's
    with torch.no_grad():
        reported, out = model.loss(batch, "score", y)
    assert float(reported) == pytest.approx(float(model.tasks["score"].head.loss(out.pred, y) + out.aux_loss), rel=1e-6)


def test_local_wide_scale_centres_and_scales_by_the_training_split_and_leaves_0_1_columns():
    cfg = config(score={"plugin": "regression", "wide": ["tabular"], "wide_scale": "local"})
    model = M3TModel(cfg, modalities=["tabular"]).eval()
    numeric = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, float("nan")], [7.0, 10.0]])
    split = {"tabular": {"numeric": numeric, "categorical": torch.tensor([[0], [1], [2], [0]])}}
    stats = model.wide_statistics(split)
    mean, scale = stats["tabular"]
    raw = model.encoders["tabular"].encoder.wide_features(split["tabular"])
    # columns: 2 numbers (NaN -> 0), 2 missing indicators, the category's one-hot (+ missing)
    assert torch.allclose(mean[:2], raw[:, :2].mean(0)) and torch.allclose(scale[:2], raw[:, :2].std(0))
    assert torch.equal(mean[2:], torch.zeros(6)) and torch.equal(scale[2:], torch.ones(6))
    assert float(mean[0]) == 4.0 and float(scale[0]) == pytest.approx(2.5820, abs=1e-4)

    with torch.no_grad():
        model.tasks["score"].wide["tabular"].weight.fill_(1.0)
    model.wide_stats = {}  # an institution without statistics leaves the term out
    out = model(split, "score")
    assert out.wide_pred is None and torch.equal(out.pred, out.deep_pred)
    model.wide_stats = stats
    out = model(split, "score")
    assert torch.allclose(out.pred - out.deep_pred, ((raw - mean) / scale).sum(1), atol=1e-5)
    # only the tasks that ask for it are scaled
    plain = M3TModel(config(score={"plugin": "regression", "wide": ["tabular"]}), modalities=["tabular"])
    assert plain.wide_statistics(split) == {}


def test_samples_without_the_modality_do_not_count_in_the_statistics():
    model = M3TModel(config(score={"plugin": "regression", "wide": ["tabular"], "wide_scale": "local"}), modalities=["tabular"])
    numeric = torch.tensor([[1.0, 0.5], [3.0, 0.5], [100.0, 0.5]])
    split = {"tabular": {"numeric": numeric, "categorical": torch.zeros(3, 1, dtype=torch.long)}, "present": {"tabular": torch.tensor([True, True, False])}}
    mean, _ = model.wide_statistics(split)["tabular"]
    assert float(mean[0]) == 2.0


@pytest.mark.parametrize("key,value", [("wide_fit", "residual"), ("wide_scale", "local")])
def test_a_wide_setting_without_a_wide_term_is_a_config_error(key, value):
    with pytest.raises(ConfigError, match=rf"model\.tasks\.score\.{key}: '{value}' applies to a wide term, and task 'score' has none"):
        M3TModel(config(score={"plugin": "regression", "wide": [], key: value}))
