"""Partitioners: their statistics, reproducibility by seed, and their errors."""

import pytest
import torch
from m3tfed.data import partition as part

NAMES = [f"inst{i}" for i in range(6)]


def labels(n=3000, k=5):
    return torch.arange(n) % k


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_dirichlet_smaller_alpha_skews_labels_more():
    y = labels()
    div = {a: sum(part.label_divergence(y, part.dirichlet_label_skew(y, NAMES, a, gen(s))) for s in range(3)) / 3 for a in (0.1, 1.0, 100.0)}
    assert div[0.1] > div[1.0] > div[100.0]
    assert div[0.1] > 0.5 and div[100.0] < 0.1  # near one class each vs. near stratified


def test_dirichlet_is_a_partition_with_min_size_and_reproducible():
    y = labels()
    a = part.dirichlet_label_skew(y, NAMES, 0.3, gen(7), min_size=50)
    allrows = torch.cat(list(a.values()))
    assert len(allrows) == len(y) and len(torch.unique(allrows)) == len(y)
    assert min(len(v) for v in a.values()) >= 50
    b = part.dirichlet_label_skew(y, NAMES, 0.3, gen(7), min_size=50)
    c = part.dirichlet_label_skew(y, NAMES, 0.3, gen(8), min_size=50)
    assert all(torch.equal(a[n], b[n]) for n in NAMES)
    assert any(not torch.equal(a[n], c[n]) for n in NAMES)
    with pytest.raises(ValueError, match="cannot give 6 institutions 600"):
        part.dirichlet_label_skew(y, NAMES, 0.3, gen(0), min_size=600)


def test_quantity_skew_sizes():
    n = 6000
    for alpha, spread in ((0.3, "wide"), (1000.0, "even")):
        sizes = torch.tensor([len(v) for v in part.quantity_skew(n, NAMES, alpha, gen(1), min_size=20).values()])
        assert int(sizes.sum()) == n and int(sizes.min()) >= 20
        cv = float(sizes.double().std() / sizes.double().mean())
        assert (cv > 0.5) if spread == "wide" else (cv < 0.05), (alpha, sizes)
    a, b = part.quantity_skew(n, NAMES, 0.5, gen(3)), part.quantity_skew(n, NAMES, 0.5, gen(3))
    assert all(torch.equal(a[k], b[k]) for k in NAMES)
    # labels stay IID: a big shard's label mix is close to the pool's
    y = labels(n)
    assert part.label_divergence(y, {"big": max(a.values(), key=len)}) < 0.05


def test_natural_partition_by_column_and_overlap_error():
    groups = ["GP", "MS", "GP", "XX", "MS"]
    rows = part.natural(groups, {"a": ["GP"], "b": ["MS", "XX"]})
    assert rows["a"].tolist() == [0, 2] and rows["b"].tolist() == [1, 3, 4]
    with pytest.raises(ValueError, match="group 'GP' is given to both 'a' and 'b'"):
        part.natural(groups, {"a": ["GP"], "b": ["GP"]})


def test_modality_dropout_masks_or_removes():
    n = 2000
    split = {"image": torch.zeros(n, 1, 4, 4), "text": ["x"] * n, "targets": {"t": torch.zeros(n)}}
    part.modality_dropout(split, {"image": 0.3, "text": 1.0}, gen(0))
    assert "text" not in split and "text" not in split["present"]
    kept = float(split["present"]["image"].float().mean())
    assert abs(kept - 0.7) < 0.04
    again = {"image": torch.zeros(n, 1, 4, 4), "targets": {"t": torch.zeros(n)}}
    part.modality_dropout(again, {"image": 0.3}, gen(0))
    assert torch.equal(again["present"]["image"], split["present"]["image"])


def test_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="'zipf' is not a partitioner"):
        part.check_spec({"by": "zipf"}, "x")
    with pytest.raises(ValueError, match="needs label"):
        part.check_spec({"by": "dirichlet"}, "x")
    with pytest.raises(ValueError, match="unknown key"):
        part.check_spec({"by": "iid", "alpha": 1}, "x")
