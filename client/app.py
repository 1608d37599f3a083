"""ClientApp: one node's share of federated MoPs training.

query  reports which data partition this node holds and its task counts, so that the server
       can sample partitions reproducibly (a resumed run replays the same clients) and draw
       the per-client task histogram from what the clients actually hold.
train  installs the global experts and gate, runs `local-steps` optimizer steps on the
       node's partition, and replies with the updated experts and gate (nothing else of the
       model travels) and what happened: examples, loss, mean gate score per expert, time.
"""

from __future__ import annotations

import time

import torch  # noqa: F401  -- Ray workers must import torch before ArrayRecord.to_torch_state_dict()
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import task
from mops_core.checkpoint import load_adapter_tensors
from mops_core.config import Settings
from mops_core.train import round_seed

app = ClientApp()


def _settings(context: Context) -> Settings:
    return Settings.from_flat(context.run_config, context="run-config")


def _partition(context: Context, settings: Settings) -> task.Partition:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("this node's node-config must set partition-id and num-partitions")
    return task.partition(settings, int(node["partition-id"]), int(node["num-partitions"]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    part = _partition(context, _settings(context))
    metrics = MetricRecord(
        {
            "partition-id": part.partition_id,
            "num-partitions": part.num_partitions,
            "num-examples": len(part.records),
            "task-counts": list(part.task_counts),
        }
    )
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    settings = _settings(context)
    config = msg.content["config"]
    session = task.ready_session(settings, str(config["start-state"]), str(config["input-prompts-sha"]))
    part = _partition(context, settings)
    examples = task.tokenised(part, session.formatter)
    global_state = msg.content["arrays"].to_torch_state_dict()
    model = session.model
    load_adapter_tensors(model, global_state, source="the server's message", keys=model.federated_state_dict())

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
