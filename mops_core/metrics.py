"""What the model says, scored as Super-NaturalInstructions scores it: ROUGE-L and exact match.

ROUGE-L is the F-measure of the longest common subsequence of words, from Google's `rouge-score`
with Porter stemming, as SNI's evaluation computes it for English tasks; exact match compares the
answer and the reference after SNI's normalisation (lower case, punctuation removed, whitespace
collapsed; articles are kept). Both are reported as percentages, as SNI reports them.

Answers come from greedy decoding with the KV-cache generator, in batches, on the first
`generation-samples` test samples of every task.
"""

from __future__ import annotations

import functools
import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from .data import Record
from .generate import Generator

_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    """SNI's normalisation before exact match: lower case, no punctuation, single spaces."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def exact_match(prediction: str, reference: str) -> float:
    return 100.0 * (normalise(prediction) == normalise(reference))


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    # Its constructor logs through absl, which gives the root logger a handler of its own: every
    # Flower log line would then print twice. Keep the root logger as it was.
    handlers = list(logging.root.handlers)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    logging.root.handlers[:] = handlers
    return scorer


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in percent; 0 when either side has no words."""
    return 100.0 * _scorer().score(reference, prediction)["rougeL"].fmeasure


@dataclass
class TaskScores:
    samples: int = 0
    rouge_l: float = 0.0  # means over the task's samples, in percent
    exact_match: float = 0.0


@dataclass
class GenerationResult:
    """ROUGE-L and exact match per task and over all scored samples (each sample counts once)."""

    per_task: dict[str, TaskScores]
    overall: TaskScores
    max_new_tokens: int
    examples: list[dict] = field(default_factory=list)  # a few answers beside their references, to read

    def to_dict(self) -> dict:
        task = lambda s: {"samples": s.samples, "rouge_l": s.rouge_l, "exact_match": s.exact_match}  # noqa: E731
        return {
            "rouge_l": self.overall.rouge_l, "exact_match": self.overall.exact_match, "samples": self.overall.samples,
            "max_new_tokens": self.max_new_tokens,
            "per_task": {t: task(s) for t, s in self.per_task.items() if s.samples},  # a task without test samples scores nothing
            "examples": self.examples,
        }


def first_per_task(records: Sequence[Record], tasks: Sequence[str], per_task: int) -> list[Record]:
    """The first `per_task` records of every task, in the run's task order (the test split is shuffled)."""
    chosen: dict[str, list[Record]] = {t: [] for t in tasks}
    for record in records:
        if record.task in chosen and len(chosen[record.task]) < per_task:
            chosen[record.task].append(record)
    return [r for t in tasks for r in chosen[t]]


def score_answers(answers: Sequence[str], records: Sequence[Record], tasks: Sequence[str], max_new_tokens: int,
                  *, shown: int = 1) -> GenerationResult:
    """ROUGE-L and exact match of `answers` against the records' responses, per task and overall."""
    scored = [(r.task, rouge_l(a, r.response), exact_match(a, r.response)) for a, r in zip(answers, records, strict=True)]

    def mean(rows) -> TaskScores:
        n = len(rows)
        return TaskScores(n, sum(r[1] for r in rows) / n, sum(r[2] for r in rows) / n) if n else TaskScores()

    per_task = {t: mean([s for s in scored if s[0] == t]) for t in tasks}
    examples, seen = [], dict.fromkeys(tasks, 0)
    for answer, record in zip(answers, records):
        if seen.get(record.task, shown) < shown:
            seen[record.task] += 1
            examples.append({"task": record.task, "instruction": record.instruction[:200], "answer": answer,
                             "reference": record.response})
    return GenerationResult(per_task, mean(scored), max_new_tokens, examples)


def generation_scores(generator: Generator, records: Sequence[Record], tasks: Sequence[str], *, per_task: int,
                      max_new_tokens: int, batch_size: int, progress: bool = False) -> GenerationResult:
    """Greedy answers to the first `per_task` test records of every task, scored."""
    chosen = first_per_task(records, tasks, per_task)
    answers = generator.answer_many([(r.instruction, r.context) for r in chosen], max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, progress=progress)
    return score_answers([a.text for a in answers], chosen, tasks, max_new_tokens)
