"""The clients' Dirichlet split over tasks (flwr-datasets), on hand-made records."""

import pytest

from client import node
from mops_core.config import DataConfig
from mops_core.data import TASKS, Record

DOLLY = TASKS["dolly"]


@pytest.fixture
def records(monkeypatch):
    """Stand-in training records: `count` per task for the first `tasks` tasks."""
    node.dirichlet_split.cache_clear()

    def use(count: int, tasks: int = 2) -> DataConfig:
        made = tuple(Record(f"q{t}-{i}", "", "a", DOLLY[t]) for t in range(tasks) for i in range(count))
        monkeypatch.setattr(node, "train_records", lambda data: made)
        return DataConfig(samples=count * tasks)

    yield use
    node.dirichlet_split.cache_clear()


def test_the_split_hands_every_sample_to_exactly_one_client(records):
    data = records(50, tasks=3)
    parts = node.dirichlet_split(data, 5, 0.5, 2)
    handed = sorted(i for part in parts for i in part)
    assert handed == list(range(150)) and min(len(p) for p in parts) >= 2


def test_draws_that_miss_the_least_size_are_redrawn_without_a_warning_in_every_process(records):
    """flwr-datasets warns at each draw it discards; every simulated client computing the split printed it."""
    import warnings

    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    data = records(30, tasks=7)  # the demo's shape, smaller: 7 tasks, alpha 0.5, at least 5 each; the first draw misses
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        direct = DirichletPartitioner(num_partitions=10, partition_by="task", alpha=0.5, min_partition_size=5,
                                      self_balancing=False, shuffle=True, seed=data.data_seed)
        direct.dataset = Dataset.from_dict({"task": [i // 30 for i in range(210)]})
        direct.load_partition(0)
        assert any("min_partition_size" in str(w.message) for w in seen)  # flwr-datasets' own redraws warn
        seen.clear()
        parts = node.dirichlet_split(data, 10, 0.5, 5)
    assert min(len(p) for p in parts) >= 5 and not [str(w.message) for w in seen]


def test_a_split_no_draw_can_satisfy_names_the_settings_to_change(records):
    data = records(10)  # 20 samples, 10 clients of at least 2 each: only an even split would do
    with pytest.raises(ValueError, match=r"alpha=0.01.* 20 training samples over 10 clients .*at least 2 \(min-partition-size\)") as err:
        node.dirichlet_split(data, 10, 0.01, 2)
    assert "raise alpha, lower min-partition-size, run fewer supernodes, or use partitioner 'inner-dirichlet'" in str(err.value)


def test_the_inner_dirichlet_split_gives_every_client_the_same_size(records):
    data = records(10)  # 20 samples over 10 clients, where 'dirichlet' draws leave clients short (above)
    parts = node.dirichlet_split(data, 10, 0.1, 2, "inner-dirichlet")
    assert sorted(i for part in parts for i in part) == list(range(20)) and {len(p) for p in parts} == {2}
    node.dirichlet_split.cache_clear()
    assert sorted(len(p) for p in node.dirichlet_split(records(11, tasks=3), 10, 0.5, 5, "inner-dirichlet")) == [3] * 7 + [4] * 3


def test_a_task_without_samples_leaves_no_gap_in_the_labels(records, monkeypatch):
    """Labels of the tasks that have data are 0..n-1 whatever the run's task list: the inner split needs it."""
    data = records(10, tasks=3)
    made = [r for r in node.train_records(data) if r.task != DOLLY[1]]  # the middle task has no data
    monkeypatch.setattr(node, "train_records", lambda data: tuple(made))
    monkeypatch.setattr(node, "run_tasks", lambda data: DOLLY[:3])
    parts = node.dirichlet_split(data, 4, 10.0, 1, "inner-dirichlet")
    assert sorted(i for part in parts for i in part) == list(range(20))


def test_a_lower_alpha_gives_each_client_fewer_tasks(records):
    data = records(100, tasks=4)

    def purity(alpha: float, partitioner: str) -> float:
        """The mean share of each client's commonest task."""
        node.dirichlet_split.cache_clear()
        made = node.train_records(data)
        shares = []
        for part in node.dirichlet_split(data, 10, alpha, 1, partitioner):
            counts = [sum(made[i].task == t for i in part) for t in DOLLY[:4]]
            shares.append(max(counts) / len(part))
        return sum(shares) / len(shares)

    for partitioner in ("dirichlet", "inner-dirichlet"):
        assert purity(0.1, partitioner) > 0.6 > 0.4 > purity(100.0, partitioner), partitioner


def test_each_client_holds_out_a_share_it_never_trains_on_the_same_on_every_call(records):
    from mops_core.config import Settings

    data = records(50, tasks=3)
    settings = Settings.from_flat({"samples": data.samples, "client-test-fraction": 0.2, "min-partition-size": 5})
    tasks = DOLLY[:3]
    for pid in range(4):
        part = node.partition(settings, tasks, pid, 4)
        mine = [data_records for data_records in node.dirichlet_split(settings.data, 4, 0.5, 5)[pid]]
        assert len(part.records) + len(part.heldout) == len(mine)
        assert not set(part.records) & set(part.heldout) and len(part.heldout) == round(0.2 * len(mine))
        assert sum(part.task_counts) == len(part.records)  # what the client trains on
        again = node.partition(settings, tasks, pid, 4)
        assert (again.records, again.heldout) == (part.records, part.heldout)
    whole = node.partition(settings.replace(client_test_fraction=0.0, fraction_evaluate=0.0), tasks, 0, 4)
    assert not whole.heldout and len(whole.records) == len(node.dirichlet_split(settings.data, 4, 0.5, 5)[0])
