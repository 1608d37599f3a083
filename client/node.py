"""What a client needs, built once per process and reused across rounds.

In simulation a Ray actor serves many nodes and rounds, so the session (base, tokenizer, model,
activation cache), the data and the Dirichlet split are cached at module level, keyed by the
settings that determine them; the session by all of them, so that every setting of the run
config reaches the client's model. In a deployment each message runs in a fresh process; the
on-disk caches (dequantised or compressed base, start state, activations) keep that cheap.
"""

from __future__ import annotations

import functools
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flwr_datasets.partitioner import DirichletPartitioner, InnerDirichletPartitioner

from mops_core.config import DataConfig, Settings
from mops_core.data import Columns, DataError, Example, Formatter, Record, load_records, read_records, run_tasks, sample_and_split
from mops_core.loading import base_fingerprint
from mops_core.session import Session
from mops_core.start_state import load_input_prompts, tensor_sha


@dataclass(frozen=True)
class Partition:
    """What one node trains on: a share of the run's dataset, or the node's own file."""

    partition_id: int  # -1: a node with its own file and no partition-id
    num_partitions: int  # 0 for a node's own file
    records: tuple[Record, ...]  # what the node trains on
    task_counts: tuple[int, ...]  # of those, per task of the run, in its order
    unknown_tasks: tuple[tuple[str, int], ...] = ()  # tasks the run does not know: (name, records), trained on all the same

    heldout: tuple[Record, ...] = ()  # for federated evaluation: never trained on

    @classmethod
    def of(cls, records: tuple[Record, ...], tasks: tuple[str, ...], partition_id: int, num_partitions: int,
           test_fraction: float = 0.0, seed: int = 0) -> Partition:
        """The node's records, less a held-out share drawn with a seed of its own (the same on every call)."""
        order = list(range(len(records)))
        random.Random(f"{seed}:{partition_id}:{len(records)}").shuffle(order)
        n_test = round(len(records) * test_fraction)
        if test_fraction > 0 and len(records) >= 2:
            n_test = min(max(n_test, 1), len(records) - 1)
        held = set(order[:n_test])
        train = tuple(r for i, r in enumerate(records) if i not in held)
        counts = Counter(r.task for r in train)
        unknown = tuple(sorted((t, n) for t, n in counts.items() if t not in tasks))
        heldout = tuple(r for i, r in enumerate(records) if i in held)
        return cls(partition_id, num_partitions, train, tuple(counts[t] for t in tasks), unknown, heldout)


@functools.lru_cache(maxsize=2)
def train_records(data: DataConfig) -> tuple[Record, ...]:
    """The same training split the server sees (same sampling, same seed)."""
    train, _ = sample_and_split(load_records(data), data)
    return tuple(train)


@functools.lru_cache(maxsize=2)
def dirichlet_split(data: DataConfig, num_partitions: int, alpha: float, min_size: int,
                    partitioner: str = "dirichlet") -> tuple[tuple[int, ...], ...]:
    """Record indices of every partition: a Dirichlet(alpha) split over the task label (flwr-datasets):
    each task spread over the clients ('dirichlet'), or each client's task mixture drawn, all clients
    the same size ('inner-dirichlet')."""
    from datasets import Dataset

    records = train_records(data)
    tasks = run_tasks(data)
    least = min_size if partitioner == "dirichlet" else 1
    if len(records) < num_partitions * least:
        raise ValueError(
            f"{len(records)} training samples cannot give {num_partitions} clients at least {least} each; "
            + ("lower min-partition-size or the number of supernodes" if partitioner == "dirichlet" else "run fewer supernodes")
        )
    present = sorted({tasks.index(r.task) for r in records})  # labels 0..n-1: a task without data leaves no gap
    table = Dataset.from_dict({"idx": list(range(len(records))), "task": [present.index(tasks.index(r.task)) for r in records]})
    if partitioner == "inner-dirichlet":
        size, extra = divmod(len(records), num_partitions)
        split = InnerDirichletPartitioner(
            partition_sizes=[size + (i < extra) for i in range(num_partitions)], partition_by="task", alpha=alpha,
            shuffle=True, seed=data.data_seed,
        )
    else:
        split = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="task", alpha=alpha,
            min_partition_size=min_size, self_balancing=False, shuffle=True, seed=data.data_seed,
        )
    split.dataset = table
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns at every draw that misses min_partition_size, then draws again; the
            # draw that holds is what counts, and the one none holds is the error below.
            warnings.filterwarnings("ignore", message="The specified min_partition_size", category=UserWarning)
            return tuple(tuple(split.load_partition(i)["idx"]) for i in range(num_partitions))
    except ValueError as exc:  # flwr-datasets gives up after 10 draws and names only alpha
        if partitioner != "dirichlet":
            raise ValueError(f"no inner-Dirichlet(alpha={alpha}) split of {len(records)} training samples over "
                             f"{num_partitions} clients ({exc}); raise alpha") from exc
        raise ValueError(
            f"no Dirichlet(alpha={alpha}) split of {len(records)} training samples over {num_partitions} clients "
            f"gives every client at least {min_size} (min-partition-size) ({exc}); "
            "raise alpha, lower min-partition-size, run fewer supernodes, or use partitioner 'inner-dirichlet'"
        ) from exc


def partition(settings: Settings, tasks: tuple[str, ...], partition_id: int, num_partitions: int) -> Partition:
    """Partition `partition_id` of the Dirichlet split of the run's training data."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    fed = settings.federated
    indices = dirichlet_split(settings.data, num_partitions, fed.alpha, fed.min_partition_size, fed.partitioner)[partition_id]
    records = train_records(settings.data)
    return Partition.of(tuple(records[i] for i in indices), tasks, partition_id, num_partitions,
                        fed.client_test_fraction, settings.data.data_seed)


@functools.lru_cache(maxsize=2)
def _node_file_records(path: Path, mtime_ns: int, size: int, columns: Columns) -> tuple[Record, ...]:
    return tuple(read_records(path, columns))


def local_partition(settings: Settings, tasks: tuple[str, ...], data_file: str, partition_id: int = -1) -> Partition:
    """Every record of the node's own file, read with the run's column mapping (no shared dataset needed)."""
    path = Path(data_file).expanduser()
    if not path.exists():
        raise DataError(f"data-file {path}: no such file or folder on this node")
    stat = path.stat()  # a file changed between rounds is read again
    records = _node_file_records(path, stat.st_mtime_ns, stat.st_size, Columns.of(settings.data))
    return Partition.of(records, tasks, partition_id, 0, settings.federated.client_test_fraction, settings.data.data_seed)


@functools.lru_cache(maxsize=1)
def session(settings: Settings, tasks: tuple[str, ...]) -> Session:
    """This process's session for the run's settings and tasks (the server made the on-disk caches; clients load them)."""
    return Session.open(settings, tasks=tasks, progress=False)


def ready_session(settings: Settings, tasks: tuple[str, ...], input_prompts_sha: str) -> Session:
    """The session with the server's frozen input prompts installed (checked by content hash)."""
    found = session(settings, tasks)
    if tensor_sha(found.model.input_prompts) != input_prompts_sha:
        load_input_prompts(found.model, settings, input_prompts_sha)
    return found


@functools.lru_cache(maxsize=2)
def fingerprint(settings: Settings, tasks: tuple[str, ...]) -> str:
    """The identity of the base this node loaded, as the server computes its own."""
    return base_fingerprint(session(settings, tasks).base)


@functools.lru_cache(maxsize=8)
def tokenised(part: Partition, formatter: Formatter) -> list[Example]:
    return formatter.examples(part.records)
