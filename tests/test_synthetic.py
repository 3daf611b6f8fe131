"""The embedded synthetic federation: deterministic, non-IID, with shared structure."""

import torch
from m3tfed.federation.config import load_config
from m3tfed.plugin_manager import get_catalogue


def load(seed=0):
    cfg = load_config(None)
    source = get_catalogue().get("data", "synthetic").build(**cfg.data.options)
    return cfg, source.load(cfg.institutions, seed)


def test_deterministic_and_shaped_for_the_encoders():
    cfg, a = load()
    _, b = load()
    hs = a["high_school"].train
    assert torch.equal(hs["tabular"]["numeric"].nan_to_num(), b["high_school"].train["tabular"]["numeric"].nan_to_num())
    assert hs["text"] == b["high_school"].train["text"]
    assert hs["tabular"]["numeric"].shape[1] == 6 and hs["tabular"]["categorical"].shape[1] == 3
    assert a["online_tutor"].train["image"].shape[1:] == (1, 16, 16)
    inter = a["university"].train["interactions"]
    assert inter["skill"].shape == inter["correct"].shape == inter["mask"].shape
    assert (inter["correct"][~inter["mask"]] == 0).all()
    sizes = {n: d.num_train + len(next(iter(d.val["targets"].values()))) + len(next(iter(d.test["targets"].values()))) for n, d in a.items()}
    assert sizes == {"high_school": 320, "university": 480, "online_tutor": 400, "rural_school": 48, "community_college": 240, "math_academy": 160}


def test_non_iid_but_sharing_structure():
    _, data = load()
    grade = {n: torch.cat([d.train["targets"]["grade"], d.val["targets"]["grade"], d.test["targets"]["grade"]]) for n, d in data.items() if "grade" in d.train["targets"]}
    # different ability distributions -> different grade means
    assert grade["university"].mean() - grade["rural_school"].mean() > 0.5
    # the same mapping everywhere: prior grade (feature 0) correlates with the grade at every institution
    for name, d in data.items():
        if "tabular" in d.train and "grade" in d.train["targets"]:
            x = d.train["tabular"]["numeric"][:, 0]
            y = d.train["targets"]["grade"]
            ok = ~torch.isnan(x)
            r = torch.corrcoef(torch.stack([x[ok], y[ok]]))[0, 1]
            assert r > 0.4, (name, float(r))
    # missing values follow each institution's rate
    rural = data["rural_school"].train["tabular"]["numeric"]
    uni = data["university"].train["tabular"]["numeric"]
    assert torch.isnan(rural).float().mean() > torch.isnan(uni).float().mean()


def test_modality_dropout_marks_missing_samples():
    _, data = load()
    present = data["community_college"].train["present"]
    assert set(present) == {"interactions", "text"}
    frac = 1 - present["text"].float().mean()
    assert 0.15 < frac < 0.45  # configured 0.3
