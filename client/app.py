"""ClientApp: one node's share of federated MoPs training (the messages: server/protocol.py).

query  reports which data this node holds: its partition of the run's dataset, or the node's own
       file (`--node-config 'data-file="PATH"'`), read and checked here so that a node with bad
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
       With gate-aggregation=local the node trains its own gate (kept in its node state,
       `Context.state`, from its first round's global one) and replies with the experts alone.
       With reply-cache-dir the node keeps its reply (client/replies.py): asked again for the same
       round and global state (a run resumed after its server stopped mid-round), it sends it at once.
evaluate  scores the global experts and gate (or the node's own gate) on the node's held-out
       share (`client-test-fraction` of its data, never trained on) and replies the summed loss
       and tokens, overall and per task, so that the server can weigh every client by its
       tokens; with personalize-steps, the same after adapting a copy on its training share.

A node started with --node-config 'adapter-dir="PATH"' keeps there, at every message, the latest
global experts with its own gate: a checkpoint that `mops generate` and `mops eval` load.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch  # first: Ray workers must import torch before ArrayRecord.to_torch_state_dict()
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.common.logger import FLOWER_LOGGER
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import node
from client.replies import ReplyCache
from mops_core import log_through
from mops_core.checkpoint import load_adapter_tensors, save
from mops_core.config import Settings
from mops_core.evaluate import EvalResult
from mops_core.model import GATE_PREFIX, INPUT_PROMPTS
from mops_core.session import Session
from mops_core.start_state import StartStateError, has_input_prompts, store_input_prompts
from mops_core.train import round_seed
from server import protocol

log_through(FLOWER_LOGGER)  # start-up costs (compiling, dequantising) and fallbacks, in the run's log

app = ClientApp()


def clip_when_asked(msg: Message, context: Context, call_next):
    """Flower's client-side DP clipping, for the runs whose server asks for it (dp-clipping=client)."""
    if KEY_CLIPPING_NORM in msg.content[protocol.CONFIG]:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


# For straggler tests only (benchmarks/churn.py): a node started with this in its environment sleeps
# that many seconds in every train handler, as a slow machine would.
STRAGGLE_ENV = "MOPS_TEST_STRAGGLE_SECONDS"

# What a node may set for itself with --node-config: where its base is and how it runs it.
NODE_SETTINGS = ("model", "model-cache-dir", "device", "dtype")


def _settings(context: Context) -> Settings:
    """The run's settings, with what this node's --node-config says of its own base."""
    own = {k: context.node_config[k] for k in NODE_SETTINGS if k in context.node_config}
    return Settings.from_flat({**context.run_config, **own}, context="run-config and node-config")


def _partition(context: Context, settings: Settings, tasks: tuple[str, ...]) -> node.Partition:
    config = context.node_config
    if protocol.DATA_FILE in config:
        return node.local_partition(settings, tasks, str(config[protocol.DATA_FILE]), int(config.get(protocol.PARTITION_ID, -1)))
    if protocol.PARTITION_ID not in config or protocol.NUM_PARTITIONS not in config:
        raise ValueError(f"this node's node-config must set {protocol.DATA_FILE}, or {protocol.PARTITION_ID} and {protocol.NUM_PARTITIONS}")
    return node.partition(settings, tasks, int(config[protocol.PARTITION_ID]), int(config[protocol.NUM_PARTITIONS]))


@app.query()
def query(msg: Message, context: Context) -> Message:
    settings, tasks = _settings(context), protocol.run_tasks_of(msg)
    part = _partition(context, settings, tasks)
    return protocol.report_reply(msg, protocol.NodeReport(
        partition_id=part.partition_id, num_partitions=part.num_partitions, num_examples=len(part.records),
        num_heldout=len(part.heldout), task_counts=part.task_counts,
        has_input_prompts=has_input_prompts(settings, protocol.input_prompts_sha_of(msg)),
        base_fingerprint=node.fingerprint(settings, tasks), unknown_tasks=dict(part.unknown_tasks),
    ))


@app.query("start_state")
def receive_input_prompts(msg: Message, context: Context) -> Message:
    arrays = msg.content[protocol.ARRAYS]
    if list(arrays.keys()) != [INPUT_PROMPTS]:
        raise StartStateError(f"a start-state message must carry '{INPUT_PROMPTS}' alone, got {sorted(arrays.keys())}; nothing was stored")
    store_input_prompts(_settings(context), torch.from_numpy(arrays[INPUT_PROMPTS].numpy()), protocol.input_prompts_sha_of(msg))
    return protocol.stored_reply(msg)


def _with_global_state(msg: Message, context: Context) -> tuple[Settings, Session, node.Partition]:
    """The node's session with the server's start state and this round's experts and gate, and its data."""
    settings, tasks = _settings(context), protocol.run_tasks_of(msg)
    session = node.ready_session(settings, tasks, protocol.input_prompts_sha_of(msg))
    model = session.model
    global_state = msg.content[protocol.ARRAYS].to_torch_state_dict()
    load_adapter_tensors(model, global_state, source="the server's message", keys=model.federated_state_dict())
    return settings, session, _partition(context, settings, tasks)


def _local_gate(settings: Settings, session: Session, context: Context) -> bool:
    """Under gate-aggregation=local, this node's own gate (kept in its node state) in place of the global
    one; a node sampled for the first time starts from the global, pretrained gate. Whether gates are local."""
    if settings.federated.gate_aggregation != "local" or session.model.gate is None:
        return False
    if protocol.OWN_GATE in context.state:
        load_adapter_tensors(session.model, context.state[protocol.OWN_GATE].to_torch_state_dict(),
                             source="this node's own gate", keys=_gate_keys(session))
    return True


def _gate_keys(session: Session) -> list[str]:
    return [k for k in session.model.federated_state_dict() if k.startswith(GATE_PREFIX)]


def _save_personal_adapter(context: Context, settings: Settings, session: Session) -> None:
    """With --node-config 'adapter-dir="PATH"': the global experts with this node's gate, as a checkpoint."""
    if protocol.ADAPTER_DIR in context.node_config:
        save(Path(str(context.node_config[protocol.ADAPTER_DIR])), session.model, settings, list(session.tasks))


def _reply_cache(msg: Message, context: Context) -> tuple[ReplyCache, str] | None:
    """This node's kept replies and the key of this message's, where reply-cache-dir is set. Not under
    local gates: a kept reply would skip the update of the gate this node keeps for itself."""
    settings = _settings(context)
    if not settings.federated.reply_cache_dir or settings.federated.gate_aggregation == "local":
        return None
    cache = ReplyCache(Path(settings.federated.reply_cache_dir), int(context.node_config.get(protocol.PARTITION_ID, -1)))
    global_state = {k: v.numpy() for k, v in msg.content[protocol.ARRAYS].items()}
    return cache, cache.key(protocol.server_round_of(msg), global_state, {**context.run_config, **context.node_config})


@app.train(mods=[clip_when_asked])
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    cached = _reply_cache(msg, context)
    kept = cached[0].get(protocol.server_round_of(msg), cached[1]) if cached else None
    if kept is not None:  # this round was run before and this node had finished it: the same reply, at once
        FLOWER_LOGGER.info("round %d: replying with the update this node computed for it before (reply-cache-dir)",
                           protocol.server_round_of(msg))
        return protocol.train_reply(msg, ArrayRecord(kept.arrays), **kept.metrics)
    settings, session, part = _with_global_state(msg, context)
    local = _local_gate(settings, session, context)
    _save_personal_adapter(context, settings, session)
    examples = node.tokenised(part, session.formatter)

    seed = round_seed(settings.train.seed, protocol.server_round_of(msg), part.partition_id)
    train_started = time.perf_counter()
    stats = session.train(examples, settings.federated.local_steps, seed=seed)
    time.sleep(float(os.environ.get(STRAGGLE_ENV, 0)))
    state = session.model.federated_state_dict()
    if local:  # the gate stays here, for this node's next round; only the experts travel
        context.state[protocol.OWN_GATE] = ArrayRecord({k: state.pop(k).cpu() for k in _gate_keys(session)})
    arrays = {k: v.cpu() for k, v in state.items()}
    metrics = {"examples": len(examples), "loss": stats.mean_loss, "train_seconds": time.perf_counter() - train_started,
               "client_seconds": time.perf_counter() - started, "gate": stats.mean_gate}
    if cached:
        cached[0].put(protocol.server_round_of(msg), cached[1], arrays, metrics)
    return protocol.train_reply(msg, ArrayRecord(arrays), **metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    settings, session, part = _with_global_state(msg, context)
    _local_gate(settings, session, context)
    _save_personal_adapter(context, settings, session)
    examples = session.formatter.examples(part.heldout)
    result = session.evaluate(examples) if examples else None
    adapted, steps, number = None, settings.federated.personalize_steps, protocol.server_round_of(msg)
    if result is not None and steps and settings.federated.costly_scores_due(number):
        # a copy adapted on the node's training share, then the same held-out tokens
        seed = round_seed(settings.train.seed, number, part.partition_id) + 1
        with session.adapted(node.tokenised(part, session.formatter), steps, seed=seed):
            adapted = session.evaluate(examples)
    nll, task_tokens, task_nll = _summed(result, session.tasks)
    after = _summed(adapted, session.tasks) if adapted is not None else (None, None, None)
    return protocol.evaluate_reply(msg, examples=len(examples), tokens=result.tokens if result else 0, nll=nll,
                                   task_tokens=task_tokens, task_nll=task_nll, adapted_nll=after[0], adapted_task_nll=after[2])


def _summed(result: EvalResult | None, tasks: tuple[str, ...]) -> tuple[float, list[int], list[float]]:
    """Loss summed over tokens (the server weighs every client by its tokens), tokens and summed loss per task."""
    per_task = [result.per_task[t] if result and t in result.per_task else None for t in tasks]
    nll = result.loss * result.tokens if result and result.tokens else 0.0
    return nll, [s.tokens if s else 0 for s in per_task], [s.nll if s else 0.0 for s in per_task]
