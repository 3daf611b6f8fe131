"""The generated question-level response logs (``question_logs``): a valid source,
split by student, one question bank for every institution, and a federation that trains."""

import pytest
import torch
from conftest import tiny_config_dict  # noqa: F401  (conftest sets the test environment)
from m3tfed.config import load_toml
from m3tfed.data import num_samples
from m3tfed.federation.lifecycle import run_job
from m3tfed.plugins.data.question_logs import PREDICT_AT, QuestionLogs
from m3tfed.seeds import seed_for
from m3tfed.testing import check_data_source

EXAMPLE = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "question-logs.toml"


def test_question_logs_is_a_valid_source_split_by_student():
    cohorts = {"a": {"n": 30}, "b": {"n": 11, "ability_mean": 1.0}}
    data = check_data_source("question_logs", cohorts=cohorts, questions=60)
    for name, d in data.items():
        rows = [num_samples(getattr(d, s)) for s in ("train", "val", "test")]
        # every student's five samples stay on one side: each side is whole students
        assert all(r % len(PREDICT_AT) == 0 for r in rows) and sum(rows) == cohorts[name]["n"] * len(PREDICT_AT)
        logs = d.train["interactions"]
        assert int(logs["skill"].max()) < 60 and int(logs["query_skill"].max()) < 60  # question ids as skills
        assert logs["mask"].sum(1).min() >= 1 and set(d.train["targets"]) == {"next_response"}


def test_concept_ids_and_one_question_bank_for_everyone():
    src = QuestionLogs(cohorts={"a": {"n": 20}, "b": {"n": 20}}, questions=80, concepts=5, ids="concept")
    concept, difficulty, popularity = src.curriculum(3)
    again = src.curriculum(3)
    assert torch.equal(concept, again[0]) and torch.equal(difficulty, again[1])  # shared, seeded
    assert not torch.equal(difficulty, src.curriculum(4)[1])
    data = check_data_source("question_logs", cohorts={"a": {"n": 20}, "b": {"n": 20}}, questions=80, concepts=5, ids="concept", seed=3)
    for d in data.values():
        logs = d.train["interactions"]
        # the skill is the question's concept, from the same bank at every institution
        assert torch.equal(logs["query_skill"], concept[logs["query_question"]])
        seen = logs["mask"]
        assert torch.equal(logs["skill"][seen], concept[logs["question"][seen]])


def test_the_example_federation_trains_on_question_logs(tmp_path):
    d = load_toml(EXAMPLE)
    d["rounds"] = 1
    d["federation"].update({"local_steps": 2, "batch_size": 8})
    d["data"]["options"] = {"cohorts": {i["name"]: {"n": 30} for i in d["institutions"]}, "questions": 50}
    d["model"]["encoders"]["interactions"]["options"]["num_skills"] = 50
    d["evaluation"] = {"baselines": ["local"], "personalize": False, "plots": False}
    out = run_job(d, runs_dir=tmp_path, name="q", progress=lambda *a: None, echo=False)
    aucs = [r["next_response"]["auc"] for r in out["results"]["fed_moe"].values()]
    assert len(aucs) == 5 and all(0.0 <= a <= 1.0 for a in aucs)
    assert set(out["results"]) == {"fed_moe", "local"}


def test_a_cohort_with_a_curriculum_of_its_own_asks_its_share_of_the_bank():
    options = {"cohorts": {"a": {"n": 10}, "b": {"n": 10, "bank_share": 0.25, "concept_shift": 1.0}}, "questions": 200, "concepts": 10}
    src = QuestionLogs(**options)
    bank = src.curriculum(0)
    same = src.localized(src.cohorts["a"], bank, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(same, bank))  # no options: the shared bank, untouched
    concept, difficulty, popularity = src.localized(src.cohorts["b"], bank, torch.Generator().manual_seed(1))
    assert int((popularity > 0).sum()) == 50 and torch.equal(concept, bank[0])
    offset = difficulty - bank[1]
    for c in range(10):  # one offset per concept, shared by its questions
        assert torch.allclose(offset[concept == c], offset[concept == c][0].expand(int((concept == c).sum())))
    assert offset.abs().max() > 0.1
    data = check_data_source("question_logs", seed=0, **options)  # a valid source with the options too
    popularity = src.localized(src.cohorts["b"], bank, torch.Generator().manual_seed(seed_for(0, "curriculum", "b")))[2]
    asked = torch.cat([data["b"].train["interactions"]["query_skill"], data["b"].test["interactions"]["query_skill"]])
    share = set(torch.nonzero(popularity).flatten().tolist())
    assert set(asked.tolist()) <= share
    assert not set(data["a"].train["interactions"]["query_skill"].tolist()) <= share  # "a" draws from the whole bank


def test_a_bad_curriculum_names_the_cohort():
    for bad in ({"bank_share": 0.0}, {"bank_share": 1.5}, {"concept_shift": -1.0}, {"concept_shift": float("nan")}):
        with pytest.raises(ValueError, match="cohort 'b'.*bank_share"):
            QuestionLogs(cohorts={"b": {"n": 10, **bad}})
