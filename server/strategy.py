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

With local gates (`gate-aggregation = "local"`) the replies carry the experts alone: `expected` names
them, and the server's gate is sent on unchanged.

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

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mops_core.agreement import update_agreement
from mops_core.config import FederatedConfig
from mops_core.model import PROMPTS as EXPERTS_KEY  # (E, prompts per expert, width): axis 0 is the expert

from . import protocol
from .admission import Admission, answering_node
from .rounds import Replies


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
    replies: dict | None = None  # training: awaited, received, gone, late, why the round ended (server/rounds.py)
    eval_replies: dict | None = None  # the same for federated evaluation


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


def aggregate_client_eval(metrics: list[dict], tasks: list[str]) -> dict | None:
    """Token-weighted perplexity over the clients (overall and per task), and its spread over clients:
    the 10th, 50th and 90th percentile of the clients' own perplexities. None without tokens.
    Where every client also scored after adapting (personalize-steps), the same under "adapted"."""
    tokens = np.array([m[protocol.EVAL_TOKENS] for m in metrics], dtype=np.float64)
    if tokens.sum() <= 0:
        return None
    task_tokens = np.array([m[protocol.TASK_TOKENS] for m in metrics], dtype=np.float64).sum(0)
    result = {
        **_token_weighted(tokens, [m[protocol.EVAL_NLL] for m in metrics], task_tokens,
                          [m[protocol.TASK_NLL] for m in metrics], tasks),
        "tokens": int(tokens.sum()), "clients": int((tokens > 0).sum()),
        "samples": int(sum(m[protocol.NUM_EXAMPLES] for m in metrics)),
    }
    if all(protocol.ADAPTED_NLL in m for m in metrics):
        result["adapted"] = _token_weighted(tokens, [m[protocol.ADAPTED_NLL] for m in metrics], task_tokens,
                                            [m[protocol.ADAPTED_TASK_NLL] for m in metrics], tasks)
    return result


def _token_weighted(tokens: np.ndarray, nll: list[float], task_tokens: np.ndarray, task_nll: list[list[float]],
                    tasks: list[str]) -> dict:
    nll_sum = np.asarray(nll, dtype=np.float64)
    task_sum = np.asarray(task_nll, dtype=np.float64).sum(0)
    scored = tokens > 0
    own = np.exp(nll_sum[scored] / tokens[scored])  # each client's perplexity on its held-out data
    p10, p50, p90 = np.percentile(own, [10, 50, 90])
    return {
        "perplexity": float(np.exp(nll_sum.sum() / tokens.sum())), "loss": float(nll_sum.sum() / tokens.sum()),
        "p10": float(p10), "p50": float(p50), "p90": float(p90),
        "per_task": {t: float(np.exp(task_sum[i] / task_tokens[i])) for i, t in enumerate(tasks) if task_tokens[i] > 0},
    }


def update_norm(reply: Message, current: dict[str, np.ndarray]) -> float:
    """L2 distance of a reply's arrays from the global state the round started from, over every array."""
    arrays = protocol.arrays_of(reply.content)
    return float(math.sqrt(sum(np.sum((arrays[k].numpy().astype(np.float64) - v) ** 2) for k, v in current.items())))


def prompt_agreement(replies: list[Message], current: dict[str, np.ndarray]) -> dict:
    """How the replies' prompt updates agree (`mops_core.agreement`): expert by expert, weighted by the
    clients' gate, where every reply carries one (MoPs); over the whole prompt tensor otherwise (FedPrompt)."""
    deltas = [protocol.reply_array(m, EXPERTS_KEY).astype(np.float64) - current[EXPERTS_KEY] for m in replies]
    gates = [protocol.reply_gate(m) for m in replies]
    gate = np.asarray(gates, dtype=np.float64) if all(g is not None for g in gates) else None
    return update_agreement(deltas, [protocol.reply_weight(m) for m in replies], gate)


def gate_weighted_experts(replies: list[Message]) -> np.ndarray:
    """Each expert's prompts averaged over the replies with weights examples x the reply's gate on it."""
    total = norm = None
    for msg in replies:
        prompts = protocol.reply_array(msg, EXPERTS_KEY).astype(np.float64)
        weight = protocol.reply_weight(msg) * np.asarray(protocol.reply_gate(msg), dtype=np.float64)
        weight = weight.reshape((-1,) + (1,) * (prompts.ndim - 1))
        total = prompts * weight if total is None else total + prompts * weight
        norm = weight if norm is None else norm + weight
    return (total / norm).astype(np.float32)


class MoPsFedAvg(FedAvg):
    """FedAvg of the adapter arrays named in `expected`, over the nodes `admission` admitted.

    A round's replies are screened (`screen`: checks and the norm bound), then averaged (`average`);
    Flower's DP wrappers clip in between (server/privacy.py).
    """

    def __init__(
        self,
        expected: dict[str, tuple[int, ...]],
        admission: Admission,
        fed: FederatedConfig,
        *,
        seed: int,
        gated: bool,
        round_offset: int = 0,
    ) -> None:
        super().__init__(
            fraction_train=fed.fraction_train, fraction_evaluate=fed.fraction_evaluate, min_train_nodes=1,
            min_evaluate_nodes=1 if fed.fraction_evaluate > 0 else 0, min_available_nodes=fed.min_available_nodes,
            weighted_by_key=protocol.NUM_EXAMPLES, arrayrecord_key=protocol.ARRAYS, configrecord_key=protocol.CONFIG,
        )
        self.expected = expected
        # Nodes that connect after discovery are admitted before they are first sampled (`sample`).
        self.admission = admission
        self.tasks = list(admission.tasks)
        self.seed = seed
        self.round_offset = round_offset
        self.wait_timeout = fed.round_timeout
        self.norm_bound = fed.norm_bound  # (bound, relative to the round's median) or None
        expert_weighting = fed.expert_aggregation if gated else "examples"
        if expert_weighting == "gate" and EXPERTS_KEY not in expected:
            raise ValueError(f"expert_weighting='gate' needs the '{EXPERTS_KEY}' array among the averaged ones")
        self.gate_experts = expected[EXPERTS_KEY][0] if expert_weighting == "gate" else None
        self.rounds: dict[int, RoundLog] = {}
        self.eval_started: dict[int, float] = {}  # round -> when its evaluation messages went out
        self.current: dict[str, np.ndarray] | None = None  # the global state the round's updates are measured from
        # What is sent but not sent back (local gates: the server's gate), so it is kept as it was.
        self.kept: dict[str, Array] = {}
        self.sent: list[Message] = []  # this round's training messages, to name the node a SuperLink-made error is about
        self.sent_evaluate: list[Message] = []

    def round_number(self, server_round: int) -> int:
        """The run's round number: Flower counts from 1 again when a run resumes."""
        return server_round + self.round_offset

    def round_log(self, server_round: int) -> RoundLog:
        number = self.round_number(server_round)
        return self.rounds.setdefault(number, RoundLog(number))

    def partition(self, node: int) -> int | str:
        return self.admission.partitions.get(node, "?")

    def sample(self, grid: Grid, server_round: int, *, evaluate: bool = False) -> list[int]:
        """The round's nodes, drawn by partition with a seeded RNG (evaluation draws with its own)."""
        connected = wait_for_nodes(grid, self.min_available_nodes, self.wait_timeout)
        newcomers = [n for n in connected if n not in self.admission.seen]
        if newcomers:
            log(INFO, "admitting %d nodes that connected since: %s", len(newcomers), newcomers)
            self.admission.admit(grid, newcomers)
        left_out = self.admission.left_out
        nodes = [n for n in connected if n not in left_out and n in self.admission.reports]  # not those that never answered
        if not nodes:
            raise RuntimeError(f"every connected node was left out ({len(left_out)} nodes: bad data or a foreign base)")
        fraction, least = (self.fraction_evaluate, self.min_evaluate_nodes) if evaluate else (self.fraction_train, self.min_train_nodes)
        size = min(len(nodes), max(int(len(nodes) * fraction), least))
        ordered = sorted(nodes, key=lambda n: (self.admission.partitions.get(n, math.inf), n))
        rng = random.Random(f"{self.seed}:{self.round_number(server_round)}" + (":evaluate" if evaluate else ""))
        return rng.sample(ordered, size)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        number = self.round_number(server_round)
        round_log = self.rounds[number] = RoundLog(number)
        self.current = {k: v.numpy().astype(np.float64) for k, v in arrays.items() if k in self.expected}
        self.kept = {k: v for k, v in arrays.items() if k not in self.expected}
        node_ids = self.sample(grid, server_round)
        config[protocol.SERVER_ROUND] = number
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        round_log.sampled = len(node_ids)
        round_log.bytes_down = arrays.count_bytes() * len(node_ids)
        shown = sorted(self.admission.partitions.get(n, -1) for n in node_ids)
        log(INFO, "round %d: training on %d nodes (partitions %s)", number, len(node_ids), shown)
        self.sent = self._messages(record, node_ids, MessageType.TRAIN, number)  # the grid gives them ids
        return self.sent

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        node_ids = self.sample(grid, server_round, evaluate=True)
        number = self.round_number(server_round)
        self.eval_started[number] = time.perf_counter()
        config[protocol.SERVER_ROUND] = number
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        self.sent_evaluate = self._messages(record, node_ids, MessageType.EVALUATE, number)
        return self.sent_evaluate

    def _messages(self, record: RecordDict, node_ids: list[int], message_type: str, number: int) -> list[Message]:
        """One message per node; their group is the round's number, which `note_replies` reads back."""
        messages = list(self._construct_messages(record, node_ids, message_type))
        for message in messages:
            message.metadata.group_id = str(number)
        return messages

    def note_replies(self, replies: Replies) -> None:
        """What the grid (server/rounds.py) says of a round's replies: awaited, received, dropped, why it ended."""
        if replies.message_type in (MessageType.TRAIN, MessageType.EVALUATE) and replies.group.isdigit():
            round_log = self.rounds.setdefault(int(replies.group), RoundLog(int(replies.group)))
            if replies.message_type == MessageType.TRAIN:
                round_log.replies = replies.to_row()
            else:
                round_log.eval_replies = replies.to_row()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Clients' held-out scores weighed by tokens; a failed or bad reply is logged and left out."""
        round_log = self.round_log(server_round)
        usable = []
        for msg in replies:
            node = answering_node(msg, self.sent_evaluate)
            if msg.has_error():
                log(WARNING, "node %d (partition %s) failed to evaluate: %s", node, self.partition(node), msg.error.reason)
                self.admission.readmit_if_lacking_prompts(node, msg.error.reason)
                continue
            problem = protocol.eval_reply_problem(msg.content, len(self.tasks))
            if problem:
                log(WARNING, "dropping the evaluation reply of node %d (partition %s): %s", node, self.partition(node), problem)
                continue
            usable.append(dict(protocol.metrics_of(msg.content)))
        round_log.client_eval = aggregate_client_eval(usable, self.tasks) if usable else None
        round_log.client_eval_seconds = time.perf_counter() - self.eval_started.pop(round_log.round, time.perf_counter())
        if round_log.client_eval is None:
            return None
        return MetricRecord({k: v for k, v in round_log.client_eval.items() if k not in ("per_task", "adapted")})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.average(server_round, self.screen(server_round, replies))

    def screen(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """The replies that may be averaged: failed and malformed ones dropped, then any update farther
        from the global state than `update-norm-bound`, each with a log line naming the node."""
        round_log = self.round_log(server_round)
        accepted: list[Message] = []
        metric_keys: set[str] | None = None
        for msg in replies:
            node = answering_node(msg, self.sent)
            if msg.has_error():
                round_log.failed += 1
                log(WARNING, "node %d (partition %s) failed: %s", node, self.partition(node), msg.error.reason)
                self.admission.readmit_if_lacking_prompts(node, msg.error.reason)
                continue
            for record in msg.content.array_records.values():
                round_log.bytes_up += record.count_bytes()
            problem = protocol.train_reply_problem(msg.content, self.expected, self.gate_experts)
            keys = set(protocol.metrics_of(msg.content).keys()) if problem is None else None
            if problem is None and metric_keys is not None and keys != metric_keys:
                problem = f"its metrics {sorted(keys)} differ from the other replies' {sorted(metric_keys)}"
            if problem:
                self._drop(round_log, node, problem)
                continue
            metric_keys = keys if metric_keys is None else metric_keys
            accepted.append(msg)
        if accepted and self.current is not None:
            accepted = self._within_norm_bound(round_log, accepted)
        if accepted and self.current is not None and EXPERTS_KEY in self.current:
            round_log.agreement = prompt_agreement(accepted, self.current)
        round_log.accepted = len(accepted)
        round_log.train_seconds = sum(float(protocol.metrics_of(m.content).get(protocol.TRAIN_SECONDS, 0.0)) for m in accepted)
        # A fixed summation order makes the average bit-reproducible, whatever order Ray replies in.
        return sorted(accepted, key=lambda m: (self.admission.partitions.get(m.metadata.src_node_id, math.inf), m.metadata.src_node_id))

    def _within_norm_bound(self, round_log: RoundLog, accepted: list[Message]) -> list[Message]:
        norms = [update_norm(m, self.current) for m in accepted]
        round_log.update_norm_median = float(np.median(norms))
        if self.norm_bound is None:
            return accepted
        bound, relative = self.norm_bound
        limit = bound * round_log.update_norm_median if relative else bound
        kept = []
        for msg, norm in zip(accepted, norms):
            if norm > limit:
                what = f"{bound:g}x the round's median {round_log.update_norm_median:.4g}" if relative else f"{bound:g}"
                self._drop(round_log, msg.metadata.src_node_id, f"its update's norm {norm:.4g} exceeds update-norm-bound ({what})")
            else:
                kept.append(msg)
        return kept

    def _drop(self, round_log: RoundLog, node: int, problem: str) -> None:
        round_log.dropped.append(f"node {node}: {problem}")
        log(WARNING, "dropping the reply of node %d (partition %s): %s", node, self.partition(node), problem)

    def average(self, server_round: int, accepted: list[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of replies `screen` accepted (each expert by examples x gate where so weighted)."""
        round_log = self.round_log(server_round)
        if not accepted:
            log(WARNING, "round %d: no usable reply; the global state stays as it was", round_log.round)
            round_log.seconds = time.perf_counter() - round_log.started
            return None, None
        arrays, metrics = super().aggregate_train(server_round, accepted)
        if arrays is not None and self.gate_experts is not None:
            arrays[EXPERTS_KEY] = Array(gate_weighted_experts(accepted))
        if arrays is not None and self.kept:
            arrays = ArrayRecord({**self.kept, **arrays})
        round_log.client_metrics = dict(metrics or {})
        round_log.seconds = time.perf_counter() - round_log.started
        return arrays, metrics
