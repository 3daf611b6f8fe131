"""The embedded synthetic education federation: generated in-process, no files.

Every student has two latent traits, ``ability`` and ``motivation``. All institutions
share how the traits produce observations (grades tables, essays, interaction logs,
handwriting) and targets, so collaboration can help; institutions differ in their trait
distributions, sizes, missing-value rates and in which modalities and tasks they have,
so the federation is non-IID by construction.

Modalities and their formats (what the built-in encoders read):
- ``tabular``: {"numeric": [N, 6] float with NaN for missing, "categorical": [N, 3] long}
- ``text``: list of N essay strings
- ``interactions``: {"skill": [N, L] long, "correct": [N, L] long, "mask": [N, L] bool}
- ``image``: [N, 1, 16, 16] float handwriting of one of four symbols
Tasks: ``grade`` (regression), ``dropout`` (2 classes), ``essay_score`` (2 scores),
``next_response`` (binary), ``symbol`` (4 classes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from m3tfed import DataSourceSpec
from m3tfed.data import InstitutionData, num_samples, split_tree
from m3tfed.seeds import seed_for

NUMERIC = ("prior_grade", "attendance", "study_hours", "absences", "engagement", "age")
CARDINALITIES = (5, 2, 2)  # parent education, school support, internet at home
NUM_SKILLS = 12
SEQ_LEN = 20
IMAGE_SIZE = 16
NUM_SYMBOLS = 4

_BASIC = "the a is was we i it and to of in my school day class good big like go do".split()
_MID = "because however study teacher learn problem example important different friends result".split()
_ADV = "consequently nevertheless hypothesis analysis perspective significant furthermore evaluate comprehensive".split()


@dataclass
class Profile:
    """How one institution's students differ from the others'."""

    n: int = 200
    ability_mean: float = 0.0
    motivation_mean: float = 0.0
    missing_rate: float = 0.05  # fraction of numeric table cells that are NaN
    modality_dropout: float = 0.0  # fraction of samples lacking each non-tabular modality
    label_noise: float = 0.3


def _students(p: Profile, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ability = torch.randn(p.n, generator=g) + p.ability_mean
    motivation = torch.randn(p.n, generator=g) + p.motivation_mean
    return ability, motivation


def tabular(a: torch.Tensor, m: torch.Tensor, p: Profile, g: torch.Generator) -> dict[str, torch.Tensor]:
    n = len(a)
    noise = lambda s: s * torch.randn(n, generator=g)  # noqa: E731
    numeric = torch.stack(
        [0.8 * a + 0.2 * m + noise(0.5), 0.6 * m + noise(0.6), 0.5 * m + 0.3 * a + noise(0.6), -0.6 * m + noise(0.6), 0.7 * m + noise(0.5), noise(1.0)],
        dim=1,
    )
    numeric[torch.rand(numeric.shape, generator=g) < p.missing_rate] = float("nan")
    parent = (2 + 0.8 * a + noise(0.8)).round().clamp(0, 4).long()
    support = (torch.rand(n, generator=g) < 0.4).long()
    internet = (torch.rand(n, generator=g) < torch.sigmoid(a)).long()
    return {"numeric": numeric, "categorical": torch.stack([parent, support, internet], dim=1)}


def essays(a: torch.Tensor, g: torch.Generator) -> list[str]:
    """Short essays: abler students write longer sentences, richer words, fewer typos."""
    texts = []
    for ability in a.tolist():
        p_adv = float(torch.sigmoid(torch.tensor(ability - 1.0)))
        p_mid = 0.5 * (1 - p_adv)
        n_words = int(20 + 8 * max(-2.0, min(2.0, ability)) + torch.randint(0, 6, (1,), generator=g))
        words = []
        for _ in range(n_words):
            r = float(torch.rand(1, generator=g))
            pool = _ADV if r < p_adv else _MID if r < p_adv + p_mid else _BASIC
            w = pool[int(torch.randint(0, len(pool), (1,), generator=g))]
            if float(torch.rand(1, generator=g)) < 0.25 * float(torch.sigmoid(torch.tensor(-ability))) and len(w) > 3:
                i = int(torch.randint(0, len(w) - 1, (1,), generator=g))
                w = w[:i] + w[i + 1] + w[i] + w[i + 2 :]  # a typo: swapped letters
            words.append(w)
        texts.append(" ".join(words) + ".")
    return texts


def interactions(a: torch.Tensor, difficulty: torch.Tensor, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Practice logs; P(correct) = sigmoid(ability + 0.15 * practice - difficulty).
    Returns the log and whether one more attempt at the last skill would be correct."""
    n = len(a)
    rows = torch.arange(n)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (n,), generator=g)
    skill = torch.randint(0, NUM_SKILLS, (n, SEQ_LEN + 1), generator=g)
    skill[rows, lengths] = skill[rows, lengths - 1]  # the next attempt is on the skill just practised
    practice = torch.zeros(n, NUM_SKILLS)
    correct = torch.zeros(n, SEQ_LEN + 1, dtype=torch.long)
    for t in range(SEQ_LEN + 1):
        s = skill[:, t]
        p = torch.sigmoid(a + 0.15 * practice[rows, s] - difficulty[s])
        correct[:, t] = (torch.rand(n, generator=g) < p).long()
        practice[rows, s] += 1
    mask = torch.arange(SEQ_LEN).unsqueeze(0) < lengths.unsqueeze(1)
    query = correct[rows, lengths]  # the attempt right after each sequence's last real one
    return {"skill": skill[:, :SEQ_LEN], "correct": correct[:, :SEQ_LEN] * mask, "mask": mask}, query.float()


def _strokes(symbol: int) -> torch.Tensor:
    img = torch.zeros(IMAGE_SIZE, IMAGE_SIZE)
    c = IMAGE_SIZE // 2
    if symbol in (0, 1, 3):  # horizontal bar(s): "+", "-", "="
        rows = [c - 3, c + 2] if symbol == 3 else [c]
        for r in rows:
            img[r - 1 : r + 1, 3:-3] = 1
    if symbol == 0:  # vertical bar of "+"
        img[3:-3, c - 1 : c + 1] = 1
    if symbol == 2:  # "x"
        idx = torch.arange(3, IMAGE_SIZE - 3)
        img[idx, idx] = 1
        img[idx, IMAGE_SIZE - 1 - idx] = 1
    return img


def handwriting(a: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Symbols with position jitter and noise; abler students write more neatly."""
    n = len(a)
    labels = torch.randint(0, NUM_SYMBOLS, (n,), generator=g)
    templates = torch.stack([_strokes(s) for s in range(NUM_SYMBOLS)])
    images = templates[labels]
    shifts = torch.randint(-2, 3, (n, 2), generator=g)
    images = torch.stack([torch.roll(img, (int(dy), int(dx)), dims=(0, 1)) for img, (dy, dx) in zip(images, shifts)])
    noise_level = 0.2 + 0.2 * torch.sigmoid(-a)
    images = images + noise_level.view(n, 1, 1) * torch.randn(images.shape, generator=g)
    return images.unsqueeze(1), labels


def targets(a, m, tab, p: Profile, g: torch.Generator) -> dict[str, torch.Tensor]:
    n = len(a)
    parent = tab["categorical"][:, 0].float()
    # A shared, mildly non-linear grade model: the same for every institution.
    grade = 0.7 * a + 0.4 * m + 0.3 * torch.tanh(a * m) + 0.15 * (parent - 2) + p.label_noise * torch.randn(n, generator=g)
    dropout_logit = -1.2 * m - 0.8 * a - 1.0
    dropout = (torch.rand(n, generator=g) < torch.sigmoid(dropout_logit)).long()
    return {"grade": grade, "dropout": dropout}


class SyntheticEducation:
    """Data source for the default federation. ``profiles`` maps an institution name to
    :class:`Profile` fields; institutions without one get the defaults."""

    def __init__(self, profiles: dict[str, dict[str, Any]] | None = None, test_fraction: float = 0.2, val_fraction: float = 0.2):
        self.profiles = {k: Profile(**v) for k, v in (profiles or {}).items()}
        self.test_fraction, self.val_fraction = test_fraction, val_fraction

    def example_institutions(self) -> list[dict[str, Any]]:
        """The default federation's institutions (what ``m3tfed.testing`` loads)."""
        from m3tfed.defaults import default_config_dict

        return [{k: i[k] for k in ("name", "modalities", "tasks")} for i in default_config_dict()["institutions"]]

    def load(self, institutions: list, seed: int, data_root: Any = None) -> dict[str, InstitutionData]:
        # Skill difficulties are a property of the curriculum, shared by everyone.
        difficulty = torch.randn(NUM_SKILLS, generator=torch.Generator().manual_seed(seed_for(seed, "skills")))
        out = {}
        for inst in institutions:
            p = self.profiles.get(inst.name, Profile())
            g = torch.Generator().manual_seed(seed_for(seed, "data", inst.name))
            a, m = _students(p, g)
            tab = tabular(a, m, p, g)
            all_targets = targets(a, m, tab, p, g)
            tree: dict[str, Any] = {"present": {}}
            if "tabular" in inst.modalities:
                tree["tabular"] = tab
            if "text" in inst.modalities or "essay_score" in inst.tasks:
                tree["text"] = essays(a, g)
                # essay scores: vocabulary and conventions, driven by ability
                all_targets["essay_score"] = torch.stack([0.9 * a, 0.6 * a + 0.3 * m], dim=1) + p.label_noise * torch.randn(p.n, 2, generator=g)
            if "interactions" in inst.modalities or "next_response" in inst.tasks:
                tree["interactions"], all_targets["next_response"] = interactions(a, difficulty, g)
            if "image" in inst.modalities or "symbol" in inst.tasks:
                tree["image"], all_targets["symbol"] = handwriting(a, g)
            for mod in inst.modalities:
                if mod != "tabular" and p.modality_dropout > 0:
                    tree["present"][mod] = torch.rand(p.n, generator=g) >= p.modality_dropout
            tree = {k: v for k, v in tree.items() if k in inst.modalities or k == "present"}
            tree["targets"] = {t: all_targets[t] for t in inst.tasks}
            # one row per generated student: the row is the unit
            train, val, test = split_tree(tree, self.val_fraction, self.test_fraction, g)
            out[inst.name] = InstitutionData(train, val, test, report={"generated": p.n, "train": num_samples(train), "val": num_samples(val), "test": num_samples(test)})
        return out


# Registered by the package (``register_data_sources``).
SPEC = DataSourceSpec(
    name="synthetic",
    build=SyntheticEducation,
    version="0.1.0",
    license="Apache-2.0",
    modalities=("tabular", "text", "interactions", "image"),
    tasks=("grade", "dropout", "essay_score", "next_response", "symbol"),
    description="embedded synthetic education federation, generated in-process",
)
