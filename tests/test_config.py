import pytest
from conftest import DATA
from m3tfed import ConfigError, get_catalogue
from m3tfed.config import apply_overrides
from m3tfed.defaults import default_config_dict
from m3tfed.federation.build import build_federation
from m3tfed.federation.config import load_config, resolve_selection


def cfg_with(mutate):
    data = default_config_dict()
    mutate(data)
    return data


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(None, ["rounds=20", "federation.lr=0.01", "model.router.options.k=1"])
    assert cfg.rounds == 20 and cfg.federation.lr == 0.01 and cfg.model.router.options["k"] == 1
    assert [i.name for i in cfg.institutions][:2] == ["high_school", "university"]


@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda d: d.update(rounds="ten"), "rounds", "expected an integer"),
        (lambda d: d["federation"].update(optimizer="adam"), "federation.optimizer", "allowed values: 'adamw', 'sgd'"),
        (lambda d: d["federation"].update(speed=3), "federation.speed", "unknown key; allowed keys:"),
        (lambda d: d["institutions"][1].update(modalities=["tabular", "smell"]), "institutions[1].modalities", "'smell' has no encoder"),
        (lambda d: d["institutions"][0].update(tasks=["grade", "iq"]), "institutions[0].tasks", "'iq' is not in model.tasks"),
        (lambda d: d["institutions"][0].pop("name"), "institutions[0].name", "required key missing"),
        (lambda d: d["federation"].update(min_institutions=99), "federation.min_institutions", "exceeds the 6 institutions"),
        (lambda d: d["aggregation"].update(experts={"plugin": "fedavg"}), "aggregation.experts", "unknown component group"),
        (lambda d: d["model"].update(n_heads=5), "model.n_heads", "divisible"),
    ],
)
def test_config_errors_name_the_key_path(mutate, path, words):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_with(mutate))
    assert err.value.path == path
    assert words in str(err.value)


def test_unknown_plugin_lists_installed_ones():
    cfg = load_config(cfg_with(lambda d: d["model"]["router"].update(plugin="telepathy")))
    with pytest.raises(ConfigError) as err:
        build_federation(cfg)
    assert err.value.path == "model.router.plugin"
    assert "telepathy" in str(err.value) and "topk" in str(err.value) and "expert_choice" in str(err.value)


def test_selection_by_modality_task_and_compute():
    cfg = load_config(None)
    cat = get_catalogue()
    by = {i.name: resolve_selection(cfg, i, cat) for i in cfg.institutions}
    assert sorted(by["rural_school"]) == ["small_0", "small_1"]  # small compute: low-rank experts only
    assert all(len(s) == 4 for n, s in by.items() if n != "rural_school")  # the base budget
    assert "text_0" in by["high_school"] and not any(e.startswith("vision") for e in by["high_school"])
    assert any(e.startswith("vision") for e in by["online_tutor"]) and not any(e.startswith("tabular") for e in by["online_tutor"])
    # every modality of an institution gets a specialist before any gets a second one
    assert {e.split("_")[0] for e in by["community_college"]} >= {"tabular", "text", "logs"}
    # institutions sharing a modality spread over its specialists
    assert len({e for s in by.values() for e in s if e.startswith("tabular")}) == 3
    # max_experts overrides the compute default
    cfg.institutions[0].max_experts = 2
    assert resolve_selection(cfg, cfg.institutions[0], cat) == by["high_school"][:2]
    # "shared": institutions sharing a modality take the same specialists, in the same order
    shared = load_config(None, ["federation.specialists=shared"])
    sel = {i.name: resolve_selection(shared, i, cat) for i in shared.institutions}
    tabular = {n: [e for e in s if e.startswith("tabular")] for n, s in sel.items()}
    assert all(t == ["tabular_0", "tabular_1", "tabular_2"][: len(t)] for t in tabular.values())
    assert len({e for t in tabular.values() for e in t}) < 3  # spread used all three
    assert sorted(sel["rural_school"]) == ["small_0", "small_1"] and all(len(s) == 4 for n, s in sel.items() if n != "rural_school")
    # "grouped" (the default): like institutions (same modalities and tasks) share,
    # unlike ones spread; the default federation's six are all unlike, so it selects as
    # "spread" does
    assert cfg.federation.specialists == "grouped"
    spread = load_config(None, ["federation.specialists=spread"])
    assert {i.name: resolve_selection(spread, i, cat) for i in spread.institutions} == by
    twins = cfg_with(lambda d: d["institutions"][2].update(modalities=d["institutions"][1]["modalities"], tasks=d["institutions"][1]["tasks"]))
    spread, grouped = load_config(twins, ["federation.specialists=spread"]), load_config(twins)
    assert resolve_selection(spread, spread.institutions[2], cat) != resolve_selection(spread, spread.institutions[1], cat)
    assert resolve_selection(grouped, grouped.institutions[2], cat) == resolve_selection(grouped, grouped.institutions[1], cat)
    assert resolve_selection(grouped, grouped.institutions[3], cat) == resolve_selection(spread, spread.institutions[3], cat)


def test_selecting_an_expert_for_a_missing_modality_is_an_error():
    cfg = load_config(cfg_with(lambda d: d["institutions"][3].update(experts=["vision_0"])))
    with pytest.raises(ConfigError) as err:
        resolve_selection(cfg, cfg.institutions[3], get_catalogue())
    assert err.value.path == "institutions[3].experts"
    assert "vision_0" in str(err.value) and "image" in str(err.value) and "rural_school" in str(err.value)


def test_override_syntax():
    assert apply_overrides({}, ["a.b=3", "c=hello", "d=[1, 2]"]) == {"a": {"b": 3}, "c": "hello", "d": [1, 2]}
    given = {"a": {"b": 1}}
    assert apply_overrides(given, ["a.b=2"]) == {"a": {"b": 2}} and given == {"a": {"b": 1}}  # the caller's dict is untouched
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nonsense"])


def test_override_names_an_entry_of_a_list():
    given = {"institutions": [{"name": "a", "tasks": ["grade"]}, {"name": "b", "tasks": ["grade"]}]}
    out = apply_overrides(given, ['institutions.b.personal=["router"]'])
    assert out["institutions"] == [{"name": "a", "tasks": ["grade"]}, {"name": "b", "tasks": ["grade"], "personal": ["router"]}]
    assert "personal" not in given["institutions"][1]  # the caller's lists are untouched
    with pytest.raises(ConfigError, match="no entry named 'c'; entries: a, b") as err:
        apply_overrides(given, ["institutions.c.personal=[]"])
    assert err.value.path == "institutions.c.personal"  # the whole key, as given
    with pytest.raises(ConfigError, match="did you mean 'rural'"):
        apply_overrides({"institutions": [{"name": "rural"}]}, ["institutions.rurl.tasks=[]"])
    with pytest.raises(ConfigError, match="'b' is an entry of 'institutions': set a key inside it"):
        apply_overrides(given, ["institutions.b=1"])
    with pytest.raises(ConfigError, match="list of values, not of named tables: set it whole, institutions.b.tasks="):
        apply_overrides(given, ["institutions.b.tasks.x=1"])
    with pytest.raises(ConfigError, match="'tasks' is not a table"):
        apply_overrides({"institutions": [{"name": "a", "tasks": 3}]}, ["institutions.a.tasks.x=1"])
    assert apply_overrides({"l": [{"name": 1}]}, ["l.1.y=2"]) == {"l": [{"name": 1, "y": 2}]}  # a TOML name read as a number
    # the CLI's path: the override reaches the loaded config
    cfg = load_config(None, ['institutions.rural_school.personal=["router"]', "model.experts.small_0.options.rank=4"])
    assert next(i for i in cfg.institutions if i.name == "rural_school").personal == ["router"]
    assert next(e for e in cfg.model.experts if e.name == "small_0").options["rank"] == 4


def test_example_configs_load_and_build():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "examples").glob("*.toml")):
        cfg = load_config(path)
        fed = build_federation(cfg, data_root=DATA)  # real-edu reads it
        assert set(fed.institutions) == {i.name for i in cfg.institutions}, path


# -- every value range-checked, every name resolved at load -------------------------------
@pytest.mark.parametrize(
    "mutate, path, words",
    [
        (lambda d: d["federation"].update(local_steps=0), "federation.local_steps", ">= 1, got 0"),
        (
            lambda d: d["federation"].update(local_steps=-5),
            "federation.local_steps",
            ">= 1, got -5",
        ),
        (lambda d: d["model"].update(n_layers=0), "model.n_layers", ">= 1, got 0"),
        (
            lambda d: d["federation"].update(max_retries=-1),
            "federation.max_retries",
            ">= 0, got -1",
        ),
        (
            lambda d: d["federation"].update(min_institutions=0),
            "federation.min_institutions",
            ">= 1, got 0",
        ),
        (lambda d: d["federation"].update(batch_size=0), "federation.batch_size", ">= 1, got 0"),
        (
            lambda d: d["federation"].update(lr=float("nan")),
            "federation.lr",
            "finite number, got nan",
        ),
        (lambda d: d["federation"].update(lr=-0.1), "federation.lr", "> 0, got -0.1"),
        (lambda d: d["federation"].update(timeout_s=-1), "federation.timeout_s", "> 0, got -1"),
        (lambda d: d["federation"].update(fraction=1.5), "federation.fraction", "<= 1, got 1.5"),
        (lambda d: d["model"].update(dropout=1.0), "model.dropout", "< 1, got 1.0"),
        (
            lambda d: d["model"].update(aux_loss_weights={"load_balance": -1.0}),
            "model.aux_loss_weights.load_balance",
            ">= 0",
        ),
        (
            lambda d: d["institutions"][2].update(modalities=[]),
            "institutions[2].modalities",
            "at least 1 item",
        ),
        (
            lambda d: d["institutions"][0].update(name="../../x"),
            "institutions[0].name",
            "not a safe name",
        ),
        (
            lambda d: d["model"]["experts"][0].update(name="a.b"),
            "model.experts[0].name",
            "not a safe name",
        ),
        (lambda d: d.update(name="../escape"), "name", "not a safe name"),
        (
            lambda d: d["institutions"][0].update(personal=["task.grad"]),
            "institutions[0].personal",
            "did you mean 'task.grade'",
        ),
        (
            lambda d: d["institutions"][0].update(personal=["encoder.image"]),
            "institutions[0].personal",
            "names no component of 'high_school'",
        ),
        (
            lambda d: d["institutions"][0].update(experts=["tabular_9"]),
            "institutions[0].experts",
            "unknown expert 'tabular_9'",
        ),
        (
            lambda d: d["model"]["experts"][2].update(modalities=["tabluar"]),
            "model.experts[2].modalities",
            "'tabluar' is not in model.encoders",
        ),
        (
            lambda d: d["institutions"][0].update(policy={"min_cohort": {"expert.tabular_O": 2}}),
            "institutions[0].policy.min_cohort.expert.tabular_O",
            "'expert.tabular_O' names no component of the model",
        ),
    ],
)
def test_values_and_names_are_checked_at_load(mutate, path, words):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_with(mutate))
    assert err.value.path == path
    assert words in str(err.value)


def test_personal_and_cohort_names_that_exist_are_accepted():
    cfg = load_config(
        cfg_with(
            lambda d: d["institutions"][0].update(
                personal=["task.grade", "router", "expert.general_0"],
                policy={"min_cohort": {"expert.tabular_0": 2}},
            )
        )
    )
    assert cfg.institutions[0].personal == ["task.grade", "router", "expert.general_0"]


def test_config_table_in_the_docs_is_current():
    from pathlib import Path

    from m3tfed.federation.config import config_table, with_config_table

    doc = (Path(__file__).resolve().parents[1] / "docs" / "federation.md").read_text()
    assert with_config_table(doc) == doc, "regenerate: python -m m3tfed.federation.config docs/federation.md"
    table = config_table()
    assert "| `federation.local_steps` | integer | >= 1 | `10` |" in table
    assert "| `institutions[].name` | string | identifier" in table
