"""FedAvg over the MoPs experts and gate only, with every reply checked before it counts.

Flower's FedAvg averages whatever arrays come back and stops aggregating when one reply is
inconsistent. Ours sends only the trainable adapter arrays (experts and gate; the base and
the frozen input prompts never travel), drops a bad reply (wrong keys or shapes, NaN/inf, no
usable example count) with a log line naming the node and the problem, and averages the
rest. Nodes are sampled by their data partition with a seeded RNG, so a resumed run trains
the same clients in the same rounds as an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mops_core.checkpoint import tensor_problems


@dataclass
class RoundLog:
    """What happened on the wire in one round (for progress lines and results.json)."""

    round: int
    sampled: int = 0
    accepted: int = 0
    failed: int = 0
    dropped: list[str] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    train_seconds: float = 0.0  # summed over accepted clients
    client_metrics: dict = field(default_factory=dict)  # example-weighted mean of the accepted replies' metrics
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0  # configure_train -> aggregate_train done


def wait_for_nodes(grid: Grid, minimum: int) -> list[int]:
    nodes = list(grid.get_node_ids())
    while len(nodes) < minimum:
        log(INFO, "Waiting for nodes: %d of %d connected", len(nodes), minimum)
        time.sleep(1.0)
        nodes = list(grid.get_node_ids())
    return nodes


def reply_problem(content: RecordDict, expected: dict[str, tuple[int, ...]], weight_key: str) -> str | None:
    """Why a training reply cannot be averaged, or None."""
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    arrays = next(iter(content.array_records.values()))
    problem = tensor_problems({k: v.numpy() for k, v in arrays.items()}, expected)
    if problem:
        return problem
    metrics = next(iter(content.metric_records.values()))
    weight = metrics.get(weight_key)
    if weight is None:
        return f"no '{weight_key}' in its metrics"
    if isinstance(weight, list) or not math.isfinite(weight) or weight <= 0:
        return f"'{weight_key}' must be a positive number, got {weight!r}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            return f"metric '{key}' is not finite"
    return None


class MoPsFedAvg(FedAvg):
    def __init__(
        self,
        expected: dict[str, tuple[int, ...]],
        *,
        seed: int,
        partitions: dict[int, int] | None = None,
        round_offset: int = 0,
        fraction_train: float = 0.1,
        min_available_nodes: int = 2,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=0.0, min_train_nodes=1,
            min_evaluate_nodes=0, min_available_nodes=min_available_nodes,
        )
        self.expected = expected
        self.seed = seed
        self.partitions = partitions or {}  # node id -> partition id
        self.round_offset = round_offset
        self.rounds: dict[int, RoundLog] = {}

    def round_number(self, server_round: int) -> int:
        """The run's round number: Flower counts from 1 again when a run resumes."""
        return server_round + self.round_offset

    def sample(self, grid: Grid, server_round: int) -> list[int]:
        nodes = wait_for_nodes(grid, self.min_available_nodes)
        size = min(len(nodes), max(int(len(nodes) * self.fraction_train), self.min_train_nodes))
        ordered = sorted(nodes, key=lambda n: (self.partitions.get(n, math.inf), n))
        rng = random.Random(f"{self.seed}:{self.round_number(server_round)}")
        return rng.sample(ordered, size)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        number = self.round_number(server_round)
        round_log = self.rounds[number] = RoundLog(number)
        node_ids = self.sample(grid, server_round)
        config["server-round"] = number
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        round_log.sampled = len(node_ids)
        round_log.bytes_down = arrays.count_bytes() * len(node_ids)
        shown = sorted(self.partitions.get(n, -1) for n in node_ids)
        log(INFO, "round %d: training on %d nodes (partitions %s)", number, len(node_ids), shown)
        return self._construct_messages(record, node_ids, MessageType.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_log = self.rounds.setdefault(self.round_number(server_round), RoundLog(self.round_number(server_round)))
        accepted: list[Message] = []
        metric_keys: set[str] | None = None
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                round_log.failed += 1
                log(WARNING, "node %d (partition %s) failed: %s", node, self.partitions.get(node, "?"), msg.error.reason)
                continue
            for record in msg.content.array_records.values():
                round_log.bytes_up += record.count_bytes()
            problem = reply_problem(msg.content, self.expected, self.weighted_by_key)
            keys = set(next(iter(msg.content.metric_records.values())).keys()) if problem is None else None
            if problem is None and metric_keys is not None and keys != metric_keys:
                problem = f"its metrics {sorted(keys)} differ from the other replies' {sorted(metric_keys)}"
            if problem:
                round_log.dropped.append(f"node {node}: {problem}")
                log(WARNING, "dropping the reply of node %d (partition %s): %s", node, self.partitions.get(node, "?"), problem)
                continue
            metric_keys = keys if metric_keys is None else metric_keys
            accepted.append(msg)
            round_log.train_seconds += float(next(iter(msg.content.metric_records.values())).get("train-seconds", 0.0))
        round_log.accepted = len(accepted)
        if not accepted:
            log(WARNING, "round %d: no usable reply; the global state stays as it was", round_log.round)
            round_log.seconds = time.perf_counter() - round_log.started
            return None, None
        # A fixed summation order makes the average bit-reproducible, whatever order Ray replies in.
        accepted.sort(key=lambda m: (self.partitions.get(m.metadata.src_node_id, math.inf), m.metadata.src_node_id))
        arrays, metrics = super().aggregate_train(server_round, accepted)
        round_log.client_metrics = dict(metrics or {})
        round_log.seconds = time.perf_counter() - round_log.started
        return arrays, metrics
