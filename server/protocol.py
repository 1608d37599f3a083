"""The messages between the ServerApp and the ClientApp, in one place.

    query              server: the run's tasks and P1's hash          node: its report (data, base, P1 held)
    query.start_state  server: the frozen input prompts P1            node: stored
    train              server: the experts and gate, the round        node: updated experts and gate (the experts alone
                                                                             when gates are local), what happened
    evaluate           server: the experts and gate, the round        node: summed loss and tokens on its held-out share
                                                                             (and after adapting, with personalize-steps)

Every record name and key travels through the names below; the builders make the messages and the
checks say why a reply cannot count, so that both apps agree by construction. The ClientApp imports
this module from here: the server defines what it asks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

START_STATE = f"{MessageType.QUERY}.start_state"

# Records of a message's content.
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"
NODE, UNKNOWN_TASKS = "node", "unknown-tasks"

# What the server's config record carries.
TASKS = "tasks"  # the run's tasks in expert order: a node may hold another dataset
INPUT_PROMPTS_SHA = "input-prompts-sha"
SERVER_ROUND = "server-round"

# A node's report at query: its data, its base, whether it holds P1.
PARTITION_ID, NUM_PARTITIONS = "partition-id", "num-partitions"
NUM_EXAMPLES, NUM_HELDOUT, TASK_COUNTS = "num-examples", "num-heldout", "task-counts"
HAS_INPUT_PROMPTS, BASE_FINGERPRINT = "has-input-prompts", "base-fingerprint"
NAMES, COUNTS = "names", "counts"  # of the unknown-tasks record
STORED = "stored"

# A training reply's metrics (NUM_EXAMPLES weighs it).
TRAIN_LOSS, TRAIN_SECONDS, CLIENT_SECONDS = "train-loss", "train-seconds", "client-seconds"
GATE = "gate"  # the client's mean gate score per expert over its local steps

# An evaluation reply's metrics: sums, so that the server weighs every client by its tokens.
EVAL_TOKENS, EVAL_NLL, TASK_TOKENS, TASK_NLL = "eval-tokens", "eval-nll", "task-tokens", "task-nll"
EVAL_KEYS = (NUM_EXAMPLES, EVAL_TOKENS, EVAL_NLL, TASK_TOKENS, TASK_NLL)
# With personalize-steps: the same held-out tokens scored after the client's adaptation.
ADAPTED_NLL, ADAPTED_TASK_NLL = "adapted-nll", "adapted-task-nll"

# What a node keeps in its Flower node state (Context.state) across rounds: its own gate (gate-aggregation=local).
OWN_GATE = "own-gate"

# What a SuperNode's --node-config may say: where its data is (a partition, or its own file), and
# where it keeps its personalized adapter (the latest global experts with its own gate).
DATA_FILE = "data-file"
ADAPTER_DIR = "adapter-dir"


def node_config_text(partition_id: int, num_partitions: int) -> str:
    """The --node-config of a SuperNode holding one partition of the run's dataset."""
    return f"{PARTITION_ID}={partition_id} {NUM_PARTITIONS}={num_partitions}"


# ---------------------------------------------------------------------- reading a message


def arrays_of(content: RecordDict) -> ArrayRecord:
    """The one ArrayRecord of a reply (checked by `train_reply_problem`)."""
    return next(iter(content.array_records.values()))


def metrics_of(content: RecordDict) -> MetricRecord:
    """The one MetricRecord of a reply (checked by the reply checks)."""
    return next(iter(content.metric_records.values()))


def run_tasks_of(msg: Message) -> tuple[str, ...]:
    return tuple(str(t) for t in msg.content[CONFIG][TASKS])


def input_prompts_sha_of(msg: Message) -> str:
    return str(msg.content[CONFIG][INPUT_PROMPTS_SHA])


def server_round_of(msg: Message) -> int:
    return int(msg.content[CONFIG][SERVER_ROUND])


# ---------------------------------------------------------------------- the server's side


def run_config(tasks: Sequence[str], input_prompts_sha: str) -> ConfigRecord:
    """What every message of the run carries: the tasks (expert order) and P1's hash."""
    return ConfigRecord({TASKS: list(tasks), INPUT_PROMPTS_SHA: input_prompts_sha})


def queries(nodes: Sequence[int], config: ConfigRecord) -> list[Message]:
    return [Message(RecordDict({CONFIG: config}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]


def start_state_messages(nodes: Sequence[int], input_prompts: ArrayRecord, input_prompts_sha: str) -> list[Message]:
    content = RecordDict({ARRAYS: input_prompts, CONFIG: ConfigRecord({INPUT_PROMPTS_SHA: input_prompts_sha})})
    return [Message(content, message_type=START_STATE, dst_node_id=n) for n in nodes]


@dataclass(frozen=True)
class NodeReport:
    """What a node said of itself at query."""

    partition_id: int  # -1: a node with its own file and no partition-id
    num_partitions: int
    num_examples: int
    num_heldout: int
    task_counts: tuple[int, ...]  # per task of the run, in its order
    has_input_prompts: bool
    base_fingerprint: str
    unknown_tasks: dict[str, int] = field(default_factory=dict)  # tasks the run does not know: records of each


def parse_report(content: RecordDict) -> NodeReport:
    metrics, node = content[METRICS], content[NODE]
    unknown = content.config_records.get(UNKNOWN_TASKS)
    return NodeReport(
        partition_id=int(metrics[PARTITION_ID]), num_partitions=int(metrics[NUM_PARTITIONS]),
        num_examples=int(metrics[NUM_EXAMPLES]), num_heldout=int(metrics[NUM_HELDOUT]),
        task_counts=tuple(int(n) for n in metrics[TASK_COUNTS]), has_input_prompts=bool(metrics[HAS_INPUT_PROMPTS]),
        base_fingerprint=str(node[BASE_FINGERPRINT]),
        unknown_tasks=dict(zip(unknown[NAMES], unknown[COUNTS])) if unknown is not None and len(unknown[NAMES]) else {},
    )


def train_reply_problem(content: RecordDict, expected: Mapping[str, tuple[int, ...]], gate_experts: int | None = None) -> str | None:
    """Why a training reply cannot be averaged, or None (`gate_experts`: E when experts are averaged by gate)."""
    from mops_core.checkpoint import tensor_problems  # torch: the launcher and deploy read the names above without it

    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}"
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    problem = tensor_problems({k: v.numpy() for k, v in arrays_of(content).items()}, dict(expected))
    if problem:
        return problem
    metrics = metrics_of(content)
    weight = metrics.get(NUM_EXAMPLES)
    if weight is None:
        return f"no '{NUM_EXAMPLES}' in its metrics"
    if isinstance(weight, list) or not math.isfinite(weight) or weight <= 0:
        return f"'{NUM_EXAMPLES}' must be a positive number, got {weight!r}"
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            return f"metric '{key}' is not finite"
    if gate_experts is not None:
        gate = metrics.get(GATE)
        if not isinstance(gate, list) or len(gate) != gate_experts:
            return f"'{GATE}' must list one mean score per expert ({gate_experts}), got {gate!r}"
        if min(gate) < 0 or sum(gate) <= 0:
            return f"'{GATE}' scores must be non-negative with a positive sum, got {gate!r}"
    return None


def eval_reply_problem(content: RecordDict, tasks: int) -> str | None:
    """Why an evaluation reply cannot be counted, or None."""
    if len(content.metric_records) != 1:
        return f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = metrics_of(content)
    missing = [k for k in EVAL_KEYS if k not in metrics]
    if missing:
        return f"no {', '.join(missing)} in its metrics"
    for key in EVAL_KEYS:
        values = metrics[key] if isinstance(metrics[key], list) else [metrics[key]]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            return f"metric '{key}' must be finite and non-negative, got {metrics[key]!r}"
    if len(metrics[TASK_TOKENS]) != tasks or len(metrics[TASK_NLL]) != tasks:
        return f"'{TASK_TOKENS}' and '{TASK_NLL}' must list one value per task ({tasks})"
    if metrics[EVAL_TOKENS] == 0 and metrics[EVAL_NLL] > 0:
        return "a loss without tokens"
    if (ADAPTED_NLL in metrics) != (ADAPTED_TASK_NLL in metrics):
        return f"'{ADAPTED_NLL}' and '{ADAPTED_TASK_NLL}' come together"
    if ADAPTED_NLL in metrics:
        values = [metrics[ADAPTED_NLL], *metrics[ADAPTED_TASK_NLL]]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            return f"'{ADAPTED_NLL}' must be finite and non-negative, got {metrics[ADAPTED_NLL]!r}"
        if len(metrics[ADAPTED_TASK_NLL]) != tasks:
            return f"'{ADAPTED_TASK_NLL}' must list one value per task ({tasks})"
    return None


def reply_weight(reply: Message) -> float:
    return float(metrics_of(reply.content)[NUM_EXAMPLES])


def reply_gate(reply: Message) -> list[float] | None:
    return metrics_of(reply.content).get(GATE)


def reply_array(reply: Message, key: str) -> np.ndarray:
    return arrays_of(reply.content)[key].numpy()


# ---------------------------------------------------------------------- the node's side


def report_reply(msg: Message, report: NodeReport) -> Message:
    metrics = MetricRecord({
        PARTITION_ID: report.partition_id, NUM_PARTITIONS: report.num_partitions, NUM_EXAMPLES: report.num_examples,
        NUM_HELDOUT: report.num_heldout, TASK_COUNTS: list(report.task_counts), HAS_INPUT_PROMPTS: int(report.has_input_prompts),
    })
    node = ConfigRecord({BASE_FINGERPRINT: report.base_fingerprint})
    unknown = ConfigRecord({NAMES: list(report.unknown_tasks), COUNTS: list(report.unknown_tasks.values())})
    return Message(RecordDict({METRICS: metrics, NODE: node, UNKNOWN_TASKS: unknown}), reply_to=msg)


def stored_reply(msg: Message) -> Message:
    return Message(RecordDict({METRICS: MetricRecord({STORED: 1})}), reply_to=msg)


def train_reply(msg: Message, update: ArrayRecord, *, examples: int, loss: float, train_seconds: float,
                client_seconds: float, gate: list[float] | None) -> Message:
    metrics = {NUM_EXAMPLES: examples, TRAIN_LOSS: loss, TRAIN_SECONDS: train_seconds, CLIENT_SECONDS: client_seconds}
    if gate is not None:
        metrics[GATE] = gate
    return Message(RecordDict({ARRAYS: update, METRICS: MetricRecord(metrics)}), reply_to=msg)


def evaluate_reply(msg: Message, *, examples: int, tokens: int, nll: float, task_tokens: list[int], task_nll: list[float],
                   adapted_nll: float | None = None, adapted_task_nll: list[float] | None = None) -> Message:
    metrics = {NUM_EXAMPLES: examples, EVAL_TOKENS: tokens, EVAL_NLL: nll, TASK_TOKENS: task_tokens, TASK_NLL: task_nll}
    if adapted_nll is not None:
        metrics.update({ADAPTED_NLL: adapted_nll, ADAPTED_TASK_NLL: adapted_task_nll})
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=msg)
