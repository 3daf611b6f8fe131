"""Generated question-level response logs: a knowledge-tracing federation of five
institutions that share a question bank, generated in-process (no files).

It stands in for the kind of data the embedded federation lacks: logs keyed by question
ids (about a thousand) rather than a dozen skills, the way a third party holding only
question ids would feed the built-in ``sequence`` encoder. docs/results.md (Learning
quality §6 and §10) measured the federation's choices on it.

The curriculum, shared by every institution: ``questions`` questions over ``concepts``
concepts; a question's difficulty is its concept's (sd 0.5) plus its own (sd 1.0); its
popularity is Zipf-like (exponent 0.7). A student answers ``attempts`` questions drawn by
popularity, correctly with probability sigmoid(ability + 0.15 x practice on the concept -
difficulty). Each student gives five samples: predict attempt 8, 16, 24, 32 and 40 from
the (up to) ``history`` attempts before it. Institutions differ in size and mean ability.

A cohort may also have a curriculum of its own (``bank_share``, ``concept_shift``): the
non-IID federation a real one is, where what one school learns of a question transfers
only in part (``examples/question-logs-shifted.toml``).

``ids = "question"`` passes question ids as ``skill`` (``num_skills = questions``, no
concepts: what a third party with only question ids does); ``"concept"`` passes the
concept as ``skill`` and the question ids as ``question`` / ``query_question``
(``num_skills = concepts``, ``num_questions = questions``). Splits are by student.

Modality ``interactions`` (``skill``, ``correct``, ``mask``, ``query_skill``, and with
concept ids ``question``, ``query_question``); task ``next_response`` (binary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from m3tfed import DataSourceSpec
from m3tfed.data import InstitutionData, num_samples, split_tree
from m3tfed.seeds import seed_for

PREDICT_AT = (8, 16, 24, 32, 40)  # the attempts each student's samples predict
PRACTICE_GAIN = 0.15  # logits per earlier attempt on the same concept


@dataclass
class Cohort:
    """One institution's students."""

    n: int = 200
    ability_mean: float = 0.0
    # Non-IID curricula (defaults: none). ``bank_share``: the share of the question bank
    # this institution's students are asked (its own random subset, as schools on
    # different textbooks); ``concept_shift``: the sd of a per-concept difficulty offset
    # here (concepts taught earlier or later, or in another language).
    bank_share: float = 1.0
    concept_shift: float = 0.0


# Five institutions of 58-802 students, as in docs/results.md.
DEFAULT_COHORTS = {
    "inst_58": {"n": 58, "ability_mean": -0.4},
    "inst_140": {"n": 140, "ability_mean": 0.3},
    "inst_260": {"n": 260, "ability_mean": -0.1},
    "inst_480": {"n": 480, "ability_mean": 0.2},
    "inst_802": {"n": 802, "ability_mean": 0.0},
}


class QuestionLogs:
    """Data source; ``cohorts`` maps an institution name to :class:`Cohort` fields
    (default: five institutions of 58-802 students)."""

    def __init__(
        self,
        cohorts: dict[str, dict[str, Any]] | None = None,
        questions: int = 1000,
        concepts: int = 20,
        history: int = 20,
        ids: Literal["question", "concept"] = "question",
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
    ):
        if ids not in ("question", "concept"):
            raise ValueError(f"ids must be 'question' or 'concept', got {ids!r}")
        if min(questions, concepts, history) < 1:
            raise ValueError(f"questions, concepts and history must be >= 1, got {questions}, {concepts}, {history}")
        self.cohorts = {k: Cohort(**v) for k, v in (DEFAULT_COHORTS if cohorts is None else cohorts).items()}
        for name, c in self.cohorts.items():
            if not (0.0 < c.bank_share <= 1.0 and 0.0 <= c.concept_shift < math.inf):
                raise ValueError(f"cohort {name!r}: bank_share must be in (0, 1] and concept_shift a finite number >= 0, got {c.bank_share}, {c.concept_shift}")
        self.questions, self.concepts, self.history, self.ids = questions, concepts, history, ids
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def example_institutions(self) -> list[dict[str, Any]]:
        return [{"name": n, "modalities": ["interactions"], "tasks": ["next_response"]} for n in self.cohorts]

    def curriculum(self, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(concept of each question, its difficulty, its popularity), shared by everyone."""
        g = torch.Generator().manual_seed(seed_for(seed, "question_bank"))
        concept = torch.randint(0, self.concepts, (self.questions,), generator=g)
        difficulty = 0.5 * torch.randn(self.concepts, generator=g)[concept] + torch.randn(self.questions, generator=g)
        popularity = 1.0 / torch.arange(1, self.questions + 1).float() ** 0.7
        return concept, difficulty, popularity[torch.randperm(self.questions, generator=g)]

    def localized(self, cohort: Cohort, bank: tuple[torch.Tensor, ...], g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """The bank as one institution sees it: its share of the questions (the rest never
        asked) and its per-concept difficulty offsets. Drawn from a generator of its own,
        so a cohort without them keeps the shared bank's stream unchanged."""
        concept, difficulty, popularity = bank
        if cohort.concept_shift > 0:
            difficulty = difficulty + cohort.concept_shift * torch.randn(self.concepts, generator=g)[concept]
        if cohort.bank_share < 1.0:
            kept = torch.zeros(self.questions, dtype=torch.bool)
            kept[torch.randperm(self.questions, generator=g)[: max(1, round(cohort.bank_share * self.questions))]] = True
            popularity = torch.where(kept, popularity, 0.0)
        return concept, difficulty, popularity

    def students(self, cohort: Cohort, bank: tuple[torch.Tensor, ...], g: torch.Generator) -> tuple[dict[str, Any], torch.Tensor]:
        """One institution's samples and the student each row belongs to."""
        concept, difficulty, popularity = bank
        n, attempts, L = cohort.n, PREDICT_AT[-1] + 1, self.history
        ability = cohort.ability_mean + torch.randn(n, generator=g)
        asked = torch.multinomial(popularity / popularity.sum(), n * attempts, replacement=True, generator=g).view(n, attempts)
        practice = torch.zeros(n, self.concepts)
        correct = torch.zeros(n, attempts, dtype=torch.long)
        rows = torch.arange(n)
        for t in range(attempts):
            c = concept[asked[:, t]]
            p = torch.sigmoid(ability + PRACTICE_GAIN * practice[rows, c] - difficulty[asked[:, t]])
            correct[:, t] = (torch.rand(n, generator=g) < p).long()
            practice[rows, c] += 1
        skill_of = (lambda q: concept[q]) if self.ids == "concept" else (lambda q: q)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("skill", "correct", "mask", "query_skill", "question", "query_question", "target")}
        for end in PREDICT_AT:
            start = max(0, end - L)
            h = end - start
            window = torch.zeros(n, L, dtype=torch.long)
            window[:, :h] = asked[:, start:end]
            mask = torch.zeros(n, L, dtype=torch.bool)
            mask[:, :h] = True
            answered = torch.zeros(n, L, dtype=torch.long)
            answered[:, :h] = correct[:, start:end]
            parts["skill"].append(torch.where(mask, skill_of(window), 0))
            parts["correct"].append(answered)
            parts["mask"].append(mask)
            parts["question"].append(window)
            parts["query_question"].append(asked[:, end])
            parts["query_skill"].append(skill_of(asked[:, end]))
            parts["target"].append(correct[:, end].float())
        logs = {k: torch.cat(parts[k]) for k in ("skill", "correct", "mask", "query_skill")}
        if self.ids == "concept":
            logs["question"], logs["query_question"] = torch.cat(parts["question"]), torch.cat(parts["query_question"])
        tree = {"interactions": logs, "present": {}, "targets": {"next_response": torch.cat(parts["target"])}}
        return tree, rows.repeat(len(PREDICT_AT))

    def load(self, institutions: list, seed: int, data_root: Any = None) -> dict[str, InstitutionData]:
        bank = self.curriculum(seed)
        out = {}
        for inst in institutions:
            cohort = self.cohorts.get(inst.name, Cohort())
            g = torch.Generator().manual_seed(seed_for(seed, "data", inst.name))
            own = self.localized(cohort, bank, torch.Generator().manual_seed(seed_for(seed, "curriculum", inst.name)))
            tree, units = self.students(cohort, own, g)
            tree["targets"] = {t: v for t, v in tree["targets"].items() if t in inst.tasks}
            train, val, test = split_tree(tree, self.val_fraction, self.test_fraction, g, units=units)
            out[inst.name] = InstitutionData(
                train, val, test, report={"students": cohort.n, "train": num_samples(train), "val": num_samples(val), "test": num_samples(test)}
            )
        return out


# Registered by the package (``register_data_sources``).
SPEC = DataSourceSpec(
    name="question_logs",
    build=QuestionLogs,
    version="0.2.0",  # 0.2: cohorts with curricula of their own (bank_share, concept_shift)
    license="Apache-2.0",
    modalities=("interactions",),
    tasks=("next_response",),
    description="generated question-level response logs: five institutions sharing a 1000-question bank (or each its own share of it), next-response prediction (ids='question' or 'concept')",
)
