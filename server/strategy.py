"""FedAvg over the MoPs experts and gate only, with every reply checked before it counts.

Flower's FedAvg averages whatever arrays come back and stops aggregating when one reply is
inconsistent. Ours sends only the trainable adapter arrays (experts and gate; the base and
the frozen input prompts never travel), drops a bad reply (wrong keys or shapes, NaN/inf, no
usable example count) with a log line naming the node and the problem, and averages the
rest. With `update-norm-bound` it also drops a well-formed update that moved too far from the
global state (a bug, or a bad actor scaling its update): absolute, or relative to the round's
median update, which adapts as the updates shrink over training. Nodes are sampled by their
data partition with a seeded RNG, so a resumed run trains the same clients in the same rounds
as an uninterrupted one; nodes left out at admission are never sampled.

With `expert_weighting="gate"` each expert's prompts are averaged with weights examples x the
client's mean gate score on that expert. In plain FedAvg an expert that one client of ten
used gets a tenth of that client's change, diluted by nine nearly unchanged copies; weighted
by use, it keeps what the clients that routed to it learned.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mops_core.agreement import update_agreement
from mops_core.checkpoint import tensor_problems
from mops_core.model import PROMPTS as EXPERTS_KEY  # (E, prompts per expert, width): axis 0 is the expert

from .admission import Admission, answering_node


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
    client_eval: dict | None = None  # federated evaluation: token-weighted perplexity and its spread over clients
    client_eval_seconds: float = 0.0  # configure_evaluate -> aggregate_evaluate done
    update_norm_median: float | None = None  # median L2 distance of the well-formed updates from the global state
    agreement: dict | None = None  # the accepted prompt updates' cosine and norm ratio (mops_core.agreement)
    screened: bool = False  # the replies were checked (once per round, before any DP clipping)


STALL_HINT_SECONDS = 30.0  # no new node for this long: say why the run may be waiting in vain


def wait_for_nodes(grid: Grid, minimum: int, timeout: float = math.inf, poll: float = 1.0) -> list[int]:
    """The connected nodes, once at least `minimum` are (min-available-nodes); at most `timeout` seconds.

    A simulation has exactly as many nodes as its federation config says, Flower's default being 2:
    when the count stops short of `minimum`, the log says what to change instead of waiting silently.
    """
    started = last_change = time.monotonic()
    nodes, hinted = list(grid.get_node_ids()), False
    while len(nodes) < minimum:
        now = time.monotonic()
        if now - started >= timeout:
            raise RuntimeError(
                f"only {len(nodes)} of the {minimum} nodes that min-available-nodes asks for connected within "
                f"{timeout:.0f} s (round-timeout); start the simulation with --federation-config 'num-supernodes={minimum}' "
                f"or lower min-available-nodes"
            )
        if not hinted and now - last_change >= STALL_HINT_SECONDS:
            hinted = True
            log(WARNING, "%d of %d nodes connected and no more for %.0f s: a simulation has as many as "
                "--federation-config 'num-supernodes=N' says (Flower's default is 2); run it with num-supernodes=%d, "
                "or set min-available-nodes=%d", len(nodes), minimum, now - last_change, minimum, len(nodes))
        time.sleep(poll)
        current = list(grid.get_node_ids())
        if len(current) != len(nodes):
            last_change = time.monotonic()
            log(INFO, "Waiting for nodes: %d of %d connected", len(current), minimum)
        nodes = current
    return nodes


GATE_METRIC = "gate"  # a client's mean gate score per expert over its local steps


def reply_problem(
    content: RecordDict, expected: dict[str, tuple[int, ...]], weight_key: str, gate_experts: int | None = None
) -> str | None:
    """Why a training reply cannot be averaged, or None (`gate_experts`: E when experts are averaged by gate)."""
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
    if gate_experts is not None:
        gate = metrics.get(GATE_METRIC)
        if not isinstance(gate, list) or len(gate) != gate_experts:
            return f"'{GATE_METRIC}' must list one mean score per expert ({gate_experts}), got {gate!r}"
        if min(gate) < 0 or sum(gate) <= 0:
            return f"'{GATE_METRIC}' scores must be non-negative with a positive sum, got {gate!r}"
    return None


EVAL_KEYS = ("num-examples", "eval-tokens", "eval-nll", "task-tokens", "task-nll")


def eval_reply_problem(content: RecordDict, tasks: int) -> str | None:
    """Why an evaluation reply cannot be counted, or None."""
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    missing = [k for k in EVAL_KEYS if k not in metrics]
    if missing:
        return f"no {', '.join(missing)} in its metrics"
    for key in EVAL_KEYS:
        values = metrics[key] if isinstance(metrics[key], list) else [metrics[key]]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            return f"metric '{key}' must be finite and non-negative, got {metrics[key]!r}"
    if len(metrics["task-tokens"]) != tasks or len(metrics["task-nll"]) != tasks:
        return f"'task-tokens' and 'task-nll' must list one value per task ({tasks})"
    if metrics["eval-tokens"] == 0 and metrics["eval-nll"] > 0:
        return "a loss without tokens"
    return None


def aggregate_client_eval(metrics: list[dict], tasks: list[str]) -> dict | None:
    """Token-weighted perplexity over the clients (overall and per task), and its spread over clients:
    the 10th, 50th and 90th percentile of the clients' own perplexities. None without tokens."""
    tokens = np.array([m["eval-tokens"] for m in metrics], dtype=np.float64)
    if tokens.sum() <= 0:
        return None
    nll = np.array([m["eval-nll"] for m in metrics], dtype=np.float64)
    scored = tokens > 0
    own = np.exp(nll[scored] / tokens[scored])  # each client's perplexity on its held-out data
    task_tokens = np.array([m["task-tokens"] for m in metrics], dtype=np.float64).sum(0)
    task_nll = np.array([m["task-nll"] for m in metrics], dtype=np.float64).sum(0)
    p10, p50, p90 = np.percentile(own, [10, 50, 90])
    return {
        "perplexity": float(np.exp(nll.sum() / tokens.sum())),
        "loss": float(nll.sum() / tokens.sum()),
        "tokens": int(tokens.sum()), "clients": int(scored.sum()), "samples": int(sum(m["num-examples"] for m in metrics)),
        "p10": float(p10), "p50": float(p50), "p90": float(p90),
        "per_task": {t: float(np.exp(task_nll[i] / task_tokens[i])) for i, t in enumerate(tasks) if task_tokens[i] > 0},
    }


def update_norm(reply: Message, current: dict[str, np.ndarray]) -> float:
    """L2 distance of a reply's arrays from the global state the round started from, over every array."""
    arrays = next(iter(reply.content.array_records.values()))
    return float(math.sqrt(sum(np.sum((arrays[k].numpy().astype(np.float64) - v) ** 2) for k, v in current.items())))


def prompt_agreement(replies: list[Message], current: dict[str, np.ndarray], weight_key: str) -> dict:
    """How the replies' prompt updates agree (`mops_core.agreement`): expert by expert, weighted by the
    clients' gate, where every reply carries one (MoPs); over the whole prompt tensor otherwise (FedPrompt)."""
    deltas, examples, gates = [], [], []
    for msg in replies:
        metrics = next(iter(msg.content.metric_records.values()))
        prompts = next(iter(msg.content.array_records.values()))[EXPERTS_KEY].numpy().astype(np.float64)
        deltas.append(prompts - current[EXPERTS_KEY])
        examples.append(float(metrics[weight_key]))
        gates.append(metrics.get(GATE_METRIC))
    gate = np.asarray(gates, dtype=np.float64) if all(g is not None for g in gates) else None
    return update_agreement(deltas, examples, gate)


def gate_weighted_experts(replies: list[Message], weight_key: str) -> np.ndarray:
    """Each expert's prompts averaged over the replies with weights examples x the reply's gate on it."""
    total = norm = None
    for msg in replies:
        metrics = next(iter(msg.content.metric_records.values()))
        prompts = next(iter(msg.content.array_records.values()))[EXPERTS_KEY].numpy().astype(np.float64)
        weight = float(metrics[weight_key]) * np.asarray(metrics[GATE_METRIC], dtype=np.float64)
        weight = weight.reshape((-1,) + (1,) * (prompts.ndim - 1))
        total = prompts * weight if total is None else total + prompts * weight
        norm = weight if norm is None else norm + weight
    return (total / norm).astype(np.float32)


class MoPsFedAvg(FedAvg):
    def __init__(
        self,
        expected: dict[str, tuple[int, ...]],
        *,
        seed: int,
        partitions: dict[int, int] | None = None,
        left_out: set[int] | frozenset[int] = frozenset(),
        round_offset: int = 0,
        fraction_train: float = 0.1,
        min_available_nodes: int = 2,
        expert_weighting: Literal["examples", "gate"] = "examples",
        wait_timeout: float = math.inf,
        fraction_evaluate: float = 0.0,
        tasks: list[str] | None = None,
        admission: Admission | None = None,
        norm_bound: tuple[float, bool] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, min_train_nodes=1,
            min_evaluate_nodes=1 if fraction_evaluate > 0 else 0, min_available_nodes=min_available_nodes,
        )
        self.tasks = list(tasks or [])
        self.eval_started: dict[int, float] = {}  # round -> when its evaluation messages went out
        self.expected = expected
        self.seed = seed
        # Nodes that connect after discovery are admitted before they are first sampled; the
        # admission's partition map and left-out set are the strategy's, updated as it admits.
        self.admission = admission
        self.partitions = admission.partitions if admission else dict(partitions or {})  # node id -> partition id
        self.left_out = admission.left_out if admission else set(left_out)  # never sampled: bad data, a foreign base
        self.round_offset = round_offset
        self.rounds: dict[int, RoundLog] = {}
        if expert_weighting not in ("examples", "gate"):
            raise ValueError(f"expert_weighting must be 'examples' or 'gate', got {expert_weighting!r}")
        if expert_weighting == "gate" and EXPERTS_KEY not in expected:
            raise ValueError(f"expert_weighting='gate' needs the '{EXPERTS_KEY}' array among the averaged ones")
        self.gate_experts = expected[EXPERTS_KEY][0] if expert_weighting == "gate" else None
        self.wait_timeout = wait_timeout
        self.norm_bound = norm_bound  # (bound, relative to the round's median) or None: FederatedConfig.norm_bound
        self.current: dict[str, np.ndarray] | None = None  # the global state the round's updates are measured from
        self.sent: list[Message] = []  # this round's training messages, to name the node a SuperLink-made error is about
        self.sent_evaluate: list[Message] = []

    def round_number(self, server_round: int) -> int:
        """The run's round number: Flower counts from 1 again when a run resumes."""
        return server_round + self.round_offset

    def sample(self, grid: Grid, server_round: int, *, evaluate: bool = False) -> list[int]:
        """The round's nodes, drawn by partition with a seeded RNG (evaluation draws with its own)."""
        connected = wait_for_nodes(grid, self.min_available_nodes, self.wait_timeout)
        if self.admission is not None:
            newcomers = [n for n in connected if n not in self.admission.seen]
            if newcomers:
                log(INFO, "admitting %d nodes that connected since: %s", len(newcomers), newcomers)
                self.admission.admit(grid, newcomers)
        admitted = self.admission.reports if self.admission is not None else None  # nodes that did not answer yet: not these
        nodes = [n for n in connected if n not in self.left_out and (admitted is None or n in admitted)]
        if not nodes:
            raise RuntimeError(f"every connected node was left out ({len(self.left_out)} nodes: bad data or a foreign base)")
        fraction, least = (self.fraction_evaluate, self.min_evaluate_nodes) if evaluate else (self.fraction_train, self.min_train_nodes)
        size = min(len(nodes), max(int(len(nodes) * fraction), least))
        ordered = sorted(nodes, key=lambda n: (self.partitions.get(n, math.inf), n))
        rng = random.Random(f"{self.seed}:{self.round_number(server_round)}" + (":evaluate" if evaluate else ""))
        return rng.sample(ordered, size)

    def _readmit_if_lacking_prompts(self, node: int, reason: str) -> None:
        if self.admission is not None:
            self.admission.readmit_if_lacking_prompts(node, reason)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        number = self.round_number(server_round)
        round_log = self.rounds[number] = RoundLog(number)
        self.current = {k: v.numpy().astype(np.float64) for k, v in arrays.items()}
        node_ids = self.sample(grid, server_round)
        config["server-round"] = number
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        round_log.sampled = len(node_ids)
        round_log.bytes_down = arrays.count_bytes() * len(node_ids)
        shown = sorted(self.partitions.get(n, -1) for n in node_ids)
        log(INFO, "round %d: training on %d nodes (partitions %s)", number, len(node_ids), shown)
        self.sent = list(self._construct_messages(record, node_ids, MessageType.TRAIN))  # the grid gives them ids
        return self.sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self.sample(grid, server_round, evaluate=True)
        number = self.round_number(server_round)
        self.eval_started[number] = time.perf_counter()
        config["server-round"] = number
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.sent_evaluate = list(self._construct_messages(record, node_ids, MessageType.EVALUATE))
        return self.sent_evaluate

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Clients' held-out scores weighed by tokens; a failed or bad reply is logged and left out."""
        round_log = self.rounds.setdefault(self.round_number(server_round), RoundLog(self.round_number(server_round)))
        usable = []
        for msg in replies:
            node = answering_node(msg, self.sent_evaluate)
            if msg.has_error():
                log(WARNING, "node %d (partition %s) failed to evaluate: %s", node, self.partitions.get(node, "?"), msg.error.reason)
                self._readmit_if_lacking_prompts(node, msg.error.reason)
                continue
            problem = eval_reply_problem(msg.content, len(self.tasks))
            if problem:
                log(WARNING, "dropping the evaluation reply of node %d (partition %s): %s", node, self.partitions.get(node, "?"), problem)
                continue
            usable.append(dict(next(iter(msg.content.metric_records.values()))))
        round_log.client_eval = aggregate_client_eval(usable, self.tasks) if usable else None
        round_log.client_eval_seconds = time.perf_counter() - self.eval_started.pop(round_log.round, time.perf_counter())
        if round_log.client_eval is None:
            return None
        return MetricRecord({k: v for k, v in round_log.client_eval.items() if k != "per_task"})

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that may be averaged: failed and malformed ones dropped, then any update farther
        from the global state than `update_norm_bound`, each with a log line naming the node."""
        round_log = self.rounds.setdefault(self.round_number(server_round), RoundLog(self.round_number(server_round)))
        round_log.screened = True
        accepted: list[Message] = []
        metric_keys: set[str] | None = None
        for msg in replies:
            node = answering_node(msg, self.sent)
            if msg.has_error():
                round_log.failed += 1
                log(WARNING, "node %d (partition %s) failed: %s", node, self.partitions.get(node, "?"), msg.error.reason)
                self._readmit_if_lacking_prompts(node, msg.error.reason)
                continue
            for record in msg.content.array_records.values():
                round_log.bytes_up += record.count_bytes()
            problem = reply_problem(msg.content, self.expected, self.weighted_by_key, self.gate_experts)
            keys = set(next(iter(msg.content.metric_records.values())).keys()) if problem is None else None
            if problem is None and metric_keys is not None and keys != metric_keys:
                problem = f"its metrics {sorted(keys)} differ from the other replies' {sorted(metric_keys)}"
            if problem:
                self._drop(round_log, node, problem)
                continue
            metric_keys = keys if metric_keys is None else metric_keys
            accepted.append(msg)
        if accepted and self.current is not None:
            norms = [update_norm(m, self.current) for m in accepted]
            round_log.update_norm_median = float(np.median(norms))
            if self.norm_bound is not None:
                bound, relative = self.norm_bound
                limit = bound * round_log.update_norm_median if relative else bound
                kept = []
                for msg, norm in zip(accepted, norms):
                    if norm > limit:
                        what = f"{bound:g}x the round's median {round_log.update_norm_median:.4g}" if relative else f"{bound:g}"
                        self._drop(round_log, msg.metadata.src_node_id, f"its update's norm {norm:.4g} exceeds update-norm-bound ({what})")
                    else:
                        kept.append(msg)
                accepted = kept
        if accepted and self.current is not None and EXPERTS_KEY in self.current:
            round_log.agreement = prompt_agreement(accepted, self.current, self.weighted_by_key)
        round_log.accepted = len(accepted)
        round_log.train_seconds = sum(float(next(iter(m.content.metric_records.values())).get("train-seconds", 0.0)) for m in accepted)
        # A fixed summation order makes the average bit-reproducible, whatever order Ray replies in.
        return sorted(accepted, key=lambda m: (self.partitions.get(m.metadata.src_node_id, math.inf), m.metadata.src_node_id))

    def _drop(self, round_log: RoundLog, node: int, problem: str) -> None:
        round_log.dropped.append(f"node {node}: {problem}")
        log(WARNING, "dropping the reply of node %d (partition %s): %s", node, self.partitions.get(node, "?"), problem)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_log = self.rounds.setdefault(self.round_number(server_round), RoundLog(self.round_number(server_round)))
        # Under a DP wrapper the replies were screened before they were clipped (see server/privacy.py).
        accepted = list(replies) if round_log.screened else self.screen(server_round, replies)
        if not accepted:
            log(WARNING, "round %d: no usable reply; the global state stays as it was", round_log.round)
            round_log.seconds = time.perf_counter() - round_log.started
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.gate_experts is not None:
            arrays[EXPERTS_KEY] = Array(gate_weighted_experts(accepted, self.weighted_by_key))
        round_log.client_metrics = dict(metrics or {})
        round_log.seconds = time.perf_counter() - round_log.started
        return arrays, metrics
