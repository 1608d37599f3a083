"""ServerApp: federated MoPs (or FedPrompt) over many non-i.i.d. clients.

    settings -> base, data, model -> start state (P1 pretrained, prompts, gate pretrained)
             -> ask every node for its partition -> rounds of MoPsFedAvg
             -> after each round: evaluate on the test split, checkpoint, results.json, figures

Everything heavy lives in `mops_core`; this file only wires it to Flower's Message API.
"""

from __future__ import annotations

import time
from collections import Counter
from logging import INFO, WARNING
from pathlib import Path

import torch  # noqa: F401  -- before ArrayRecord.to_torch_state_dict()
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from mops_core import checkpoint, report
from mops_core.config import FederatedConfig, Settings
from mops_core.loading import base_fingerprint
from mops_core.session import Session
from mops_core.start_state import prepare_or_load, tensor_sha

from .history import History, ResumeError, progress_line
from .strategy import MoPsFedAvg, wait_for_nodes

app = ServerApp()


def discover(grid: Grid, tasks: tuple[str, ...], minimum: int, timeout: float) -> tuple[dict[int, dict], set[int]]:
    """Ask every connected node what data it holds: (what each usable node reported, the nodes to leave out).

    A node that cannot read its data (a bad file, no shared dataset) is left out of sampling
    with its error logged; tasks that nodes hold and the run does not know are named once.
    """
    nodes = wait_for_nodes(grid, minimum, timeout)
    config = ConfigRecord({"tasks": list(tasks)})
    asks = [Message(RecordDict({"config": config}), message_type=MessageType.QUERY, dst_node_id=n) for n in nodes]
    found: dict[int, dict] = {}
    reasons: list[str] = []
    unknown: Counter = Counter()
    for reply in grid.send_and_receive(asks, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "node %d is left out: it could not read its data: %s", node, reply.error.reason)
            reasons.append(reply.error.reason)
            continue
        metrics = reply.content.metric_records["metrics"]
        found[node] = {k: metrics[k] for k in ("partition-id", "num-partitions", "num-examples", "task-counts")}
        found[node]["num-heldout"] = metrics.get("num-heldout", 0)
        extra = reply.content.config_records.get("unknown-tasks")
        if extra is not None:
            found[node]["unknown-tasks"] = dict(zip(extra["names"], extra["counts"]))
            unknown.update(found[node]["unknown-tasks"])
    if not found:  # every round would fail the same way: stop before training nothing
        why = "; ".join(dict.fromkeys(r.strip().splitlines()[-1] for r in reasons if r.strip())) or "no reply in time"
        raise RuntimeError(f"none of the {len(nodes)} nodes could report its data: {why}")
    if unknown:
        named = ", ".join(f"{t} ({n} records)" for t, n in sorted(unknown.items()))
        log(WARNING, "nodes hold tasks the run does not know; they train on them and the gate routes them: %s", named)
    log(INFO, "%d nodes hold %d training samples in all", len(found), sum(f["num-examples"] for f in found.values()))
    return found, set(nodes) - set(found)


def scores_text(number: int, fed: FederatedConfig) -> bool:
    """Whether round `number` scores greedy answers: every `metrics-every` rounds (from the start), and the last."""
    return number == fed.num_server_rounds or (fed.metrics_every > 0 and number % fed.metrics_every == 0)


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_flat(context.run_config, context="run-config")
    run(grid, settings)


def run(grid: Grid, settings: Settings) -> History:
    fed = settings.federated
    out = Path(fed.out_dir).resolve()
    history = History.open(out, settings)
    # Rounds finished: the checkpoint says (it is written first); -1 = none, 0 = only the start evaluated.
    done = min(history.last_round, 0)
    if history.last_round > 0 and (out / "checkpoint" / checkpoint.CONFIG_FILE).exists():
        done = int(checkpoint.read(out / "checkpoint").config.get("round", 0))
    history.rewind(done)
    if done >= fed.num_server_rounds:
        log(INFO, "%s already holds %d rounds; nothing to do", out, done)
        return history

    session = Session.open(settings)
    model = session.model
    key, start_report = prepare_or_load(session)
    sha = tensor_sha(model.input_prompts)
    if start_report is not None:
        history.info["start_state"] = {"key": key, "gate_train_accuracy": start_report.gate_train_accuracy}
    if done > 0:
        checkpoint.load_into(checkpoint.read(out / "checkpoint"), model)
        if tensor_sha(model.input_prompts) != sha:
            raise ResumeError(f"the checkpoint in {out} was trained with other input prompts than start state {key}")
        log(INFO, "resuming %s after round %d", out, done)

    tasks = session.tasks
    nodes, left_out = discover(grid, tasks, fed.min_available_nodes, fed.round_timeout)
    # A node with its own file and no partition-id is named by its node id.
    names = {n: str(f["partition-id"]) if f["partition-id"] >= 0 else f"node-{n}" for n, f in nodes.items()}
    history.info["clients"] = {names[n]: f["task-counts"] for n, f in nodes.items()}  # what each trains on, per task
    history.info["clients_heldout"] = {names[n]: f["num-heldout"] for n, f in nodes.items()}  # for federated evaluation
    unknown = {names[n]: f["unknown-tasks"] for n, f in nodes.items() if f.get("unknown-tasks")}
    if unknown:
        history.info["unknown_tasks"] = unknown
    report.plot_partitions({f["partition-id"] if f["partition-id"] >= 0 else names[n]: f["task-counts"] for n, f in nodes.items()},
                           tasks, out / "client_tasks.png")
    payload = model.federated_state_dict()
    history.info.update(
        trainable_parameters=sum(p.numel() for p in model.trainable_parameters()),
        message_parameters=sum(t.numel() for t in payload.values()),
        tasks=list(tasks),
        base_fingerprint=base_fingerprint(model.base),
        base_parameters=sum(p.numel() for p in model.base.parameters()),
    )
    strategy = MoPsFedAvg(
        {k: tuple(v.shape) for k, v in payload.items()},
        seed=settings.train.seed,
        partitions={n: f["partition-id"] for n, f in nodes.items() if f["partition-id"] >= 0},
        left_out=left_out,
        round_offset=max(done, 0),
        fraction_train=fed.fraction_train,
        min_available_nodes=fed.min_available_nodes,
        expert_weighting=fed.expert_aggregation if model.gate is not None else "examples",
        wait_timeout=fed.round_timeout,
        fraction_evaluate=fed.fraction_evaluate,
        tasks=list(tasks),
    )

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        number = strategy.round_number(server_round)
        if number <= done:  # a resumed run's starting point was evaluated before
            return None
        checkpoint.load_adapter_tensors(model, arrays.to_torch_state_dict(), source=f"round {number}", keys=payload)
        started = time.perf_counter()
        result = session.evaluate(desc=f"eval round {number}")
        generated = time.perf_counter()
        generation = session.generation() if scores_text(number, fed) else None
        row = history.add_round(number, result, strategy.rounds.get(number), time.perf_counter() - started, generation)
        row["generation_seconds"] = time.perf_counter() - generated if generation else 0.0
        checkpoint.save(out / "checkpoint", model, session.settings, list(tasks), extra={"round": number, "metrics": {"perplexity": result.perplexity}})
        history.save()
        history.plot()
        report.plot_gate_heatmap(result, out / "gate_heatmap.png", title=f"Mean gate score per task, round {number}")
        log(INFO, "%s", progress_line(row))
        return MetricRecord({"perplexity": result.perplexity, "loss": result.loss})

    shared = {"start-state": key, "input-prompts-sha": sha, "tasks": list(tasks)}  # what a client needs to rebuild the model
    strategy.start(
        grid,
        ArrayRecord({k: v.cpu() for k, v in payload.items()}),
        num_rounds=fed.num_server_rounds - max(done, 0),
        timeout=fed.round_timeout,
        train_config=ConfigRecord(shared),
        evaluate_config=ConfigRecord(shared),
        evaluate_fn=after_round,
    )
    first, last = history.rounds[0], history.rounds[-1]
    log(INFO, "perplexity %.3f (round %d) -> %.3f (round %d); results in %s", first["perplexity"], first["round"], last["perplexity"], last["round"], out)
    return history

