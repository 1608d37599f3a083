"""Drawing a run's samples evenly over its tasks, and the train/test split."""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Sequence

from ..config import DataConfig
from .records import Record

log = logging.getLogger(__name__)


def even_quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` as evenly as possible over tasks, capped by what each task has.

    Water-filling: a task with fewer rows than its share gives all it has, and the rest is
    shared again among the others. Remainders go to tasks in name order (deterministic).
    """
    quotas = {t: 0 for t in available}
    remaining = min(total, sum(available.values()))
    while remaining > 0:
        open_tasks = sorted(t for t in available if quotas[t] < available[t])
        share, extra = divmod(remaining, len(open_tasks))
        for i, task in enumerate(open_tasks):
            take = min(share + (1 if i < extra else 0), available[task] - quotas[task])
            quotas[task] += take
            remaining -= take
    return quotas


def sample_and_split(records: Sequence[Record], cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """Draw `samples` records evenly over tasks, then hold out `test_fraction` of each task."""
    by_task: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_task[record.task].append(record)
    quotas = even_quotas({t: len(rs) for t, rs in by_task.items()}, cfg.samples)
    if sum(quotas.values()) < cfg.samples:
        log.warning("asked for %d samples, the data holds %d", cfg.samples, sum(quotas.values()))
    rng = random.Random(cfg.data_seed)
    train: list[Record] = []
    test: list[Record] = []
    for task in sorted(by_task):
        pool = sorted(by_task[task], key=lambda r: (r.instruction, r.context, r.response))
        rng.shuffle(pool)
        chosen = pool[: quotas[task]]
        n_test = round(len(chosen) * cfg.test_fraction)
        if len(chosen) >= 2:
            n_test = min(max(n_test, 1), len(chosen) - 1)
        test += chosen[:n_test]
        train += chosen[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def task_counts(records: Sequence[Record]) -> Counter:
    return Counter(r.task for r in records)
