"""ClientApp: one node's share of federated MoPs training.

query  reports which data this node holds: its partition of the run's dataset, or the node's own
       file (`--node-config "data-file=PATH"`), read and checked here so that a node with bad
       data is left out before round 1; its count per task of the run, and of tasks the run does
       not know. It also reports the fingerprint of the base it loaded (the server leaves out a
       node whose base differs) and whether it holds the run's frozen input prompts. The server
       samples by partition (a resumed run replays the same clients) and draws the per-client
       task histogram from what the clients actually hold.
query.start_state  stores the frozen input prompts the server sends a node that lacks them,
       after checking their hash (nothing is stored otherwise).
train  installs the global experts and gate, runs `local-steps` optimizer steps on the
       node's partition, and replies with the updated experts and gate (nothing else of the
       model travels) and what happened: examples, loss, mean gate score per expert, time.
evaluate  scores the global experts and gate on the node's held-out share (`client-test-fraction`
       of its data, never trained on) and replies the summed loss and tokens, overall and per
       task, so that the server can weigh every client by its tokens.
"""

from __future__ import annotations

import time

import torch  # first: Ray workers must import torch before ArrayRecord.to_torch_state_dict()
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.logger import FLOWER_LOGGER
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import task
from mops_core import log_through
from mops_core.checkpoint import load_adapter_tensors
from mops_core.config import Settings
from mops_core.model import INPUT_PROMPTS
from mops_core.session import Session
from mops_core.start_state import StartStateError, has_input_prompts, store_input_prompts
from mops_core.train import round_seed

log_through(FLOWER_LOGGER)  # start-up costs (compiling, dequantising) and fallbacks, in the run's log

app = ClientApp()


def clip_when_asked(msg: Message, context: Context, call_next):
    """Flower's client-side DP clipping, for the runs whose server asks for it (dp-clipping=client)."""
    if KEY_CLIPPING_NORM in msg.content["config"]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# What a node may set for itself with --node-config: where its base is and how it runs it.
NODE_SETTINGS = ("model", "model-cache-dir", "device", "dtype")


def _settings(context: Context) -> Settings:
    """The run's settings, with what this node's --node-config says of its own base."""
    own = {k: context.node_config[k] for k in NODE_SETTINGS if k in context.node_config}
    return Settings.from_flat({**context.run_config, **own}, context="run-config and node-config")


def _tasks(msg: Message) -> tuple[str, ...]:
    """The run's tasks in expert order, as the server names them (a node may not hold the run's dataset)."""
    return tuple(str(t) for t in msg.content["config"]["tasks"])


def _partition(context: Context, settings: Settings, tasks: tuple[str, ...]) -> task.Partition:
    node = context.node_config
    if "data-file" in node:
        return task.local_partition(settings, tasks, str(node["data-file"]), int(node.get("partition-id", -1)))
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("this node's node-config must set data-file, or partition-id and num-partitions")
    return task.partition(settings, tasks, int(node["partition-id"]), int(node["num-partitions"]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    settings, tasks = _settings(context), _tasks(msg)
    part = _partition(context, settings, tasks)
    metrics = MetricRecord(
        {
            "partition-id": part.partition_id,
            "num-partitions": part.num_partitions,
            "num-examples": len(part.records),
            "num-heldout": len(part.heldout),
            "task-counts": list(part.task_counts),
            "has-input-prompts": int(has_input_prompts(settings, str(msg.content["config"]["input-prompts-sha"]))),
        }
    )
    node = ConfigRecord({"base-fingerprint": task.fingerprint(settings, tasks)})
    unknown = ConfigRecord({"names": [t for t, _ in part.unknown_tasks], "counts": [n for _, n in part.unknown_tasks]})
    return Message(RecordDict({"metrics": metrics, "node": node, "unknown-tasks": unknown}), reply_to=msg)


@app.query("start_state")
def receive_input_prompts(msg: Message, context: Context) -> Message:
    sha = str(msg.content["config"]["input-prompts-sha"])
    arrays = msg.content["arrays"]
    if list(arrays.keys()) != [INPUT_PROMPTS]:
        raise StartStateError(f"a start-state message must carry '{INPUT_PROMPTS}' alone, got {sorted(arrays.keys())}; nothing was stored")
    store_input_prompts(_settings(context), torch.from_numpy(arrays[INPUT_PROMPTS].numpy()), sha)
    return Message(RecordDict({"metrics": MetricRecord({"stored": 1})}), reply_to=msg)


def _with_global_state(msg: Message, context: Context) -> tuple[Settings, Session, task.Partition]:
    """The node's session with the server's start state and this round's experts and gate, and its data."""
    settings = _settings(context)
    config = msg.content["config"]
    tasks = _tasks(msg)
    session = task.ready_session(settings, tasks, str(config["input-prompts-sha"]))
    model = session.model
    global_state = msg.content["arrays"].to_torch_state_dict()
    load_adapter_tensors(model, global_state, source="the server's message", keys=model.federated_state_dict())
    return settings, session, _partition(context, settings, tasks)


@app.train(mods=[clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    settings, session, part = _with_global_state(msg, context)
    config, model = msg.content["config"], session.model
    examples = task.tokenised(part, session.formatter)

    seed = round_seed(settings.train.seed, int(config["server-round"]), part.partition_id)
    train_started = time.perf_counter()
    stats = session.train(examples, settings.federated.local_steps, seed=seed)
    metrics = {
        "num-examples": len(examples),
        "train-loss": stats.mean_loss,
        "train-seconds": time.perf_counter() - train_started,
        "client-seconds": time.perf_counter() - started,
    }
    if stats.mean_gate is not None:
        metrics["gate"] = stats.mean_gate
    update = {k: v.cpu() for k, v in model.federated_state_dict().items()}
    return Message(RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings, session, part = _with_global_state(msg, context)
    examples = session.formatter.examples(part.heldout)
    result = session.evaluate(examples) if examples else None
    tokens = result.tokens if result else 0
    per_task = [result.per_task[t] if result and t in result.per_task else None for t in session.tasks]
    metrics = {
        "num-examples": len(examples),
        "eval-tokens": tokens,
        "eval-nll": result.loss * tokens if tokens else 0.0,  # summed over tokens: the server weighs by tokens
        "task-tokens": [s.tokens if s else 0 for s in per_task],
        "task-nll": [s.nll if s else 0.0 for s in per_task],
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
