"""ServerApp: federated MoPs (or FedPrompt) over many non-i.i.d. clients.

    settings -> where the run stands (fresh, started, or after round N)
             -> the model at that point (start state: P1 pretrained, prompts, gate pretrained; or the checkpoint)
             -> admit every node (its partition, its base; P1 sent where lacking)
             -> rounds of MoPsFedAvg (each waits for its replies as server/rounds.py rules), each ended by
                RoundEnd: evaluate, checkpoint, results.json, figures,
                the tracker (TensorBoard by default, under out-dir/tensorboard)

Everything heavy lives in `mops_core`; this file only wires it to Flower's Message API.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch  # noqa: F401  -- before ArrayRecord.to_torch_state_dict()
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from mops_core import checkpoint, log_through, report
from mops_core.cache import stale_note
from mops_core.checkpoint import CheckpointError
from mops_core.config import FederatedConfig, Settings
from mops_core.loading import base_fingerprint, cache_root, machine
from mops_core.model import GATE_PREFIX, MoPsModel
from mops_core.session import Session
from mops_core.start_state import prepare_or_load, store_input_prompts, tensor_sha
from mops_core.tracking import Tracker, open_tracker

from .admission import Admission
from .history import History, ResumeError, ResumePoint, progress_line, round_scalars
from .privacy import with_privacy
from .rounds import ReplyRule, RoundGrid
from .strategy import MoPsFedAvg, wait_for_nodes

log_through(FLOWER_LOGGER)  # start-up costs (compiling, dequantising) and fallbacks, in the run's log

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = Settings.from_flat(context.run_config, context="run-config")
    run(grid, settings)


def run(grid: Grid, settings: Settings) -> History:
    fed = settings.federated
    grid = RoundGrid(grid, ReplyRule.of(fed))  # rounds end when what is owed cannot come (server/rounds.py)
    history = History.open(Path(fed.out_dir).resolve(), settings)
    start = history.resume_point()
    if start.round >= fed.num_server_rounds:
        log(INFO, "%s already holds %d rounds; nothing to do", history.out_dir, start.round)
        return history

    session = open_session(settings, history, start)
    admission = admit_nodes(grid, session, history)
    payload = session.model.federated_state_dict()  # what travels: the experts and the gate
    strategy = MoPsFedAvg(
        {k: tuple(v.shape) for k, v in payload.items() if k in averaged_keys(session.model, fed)}, admission, fed,
        seed=settings.train.seed, gated=session.model.gate is not None, round_offset=start.round,
    )
    sampled = max(int(len(admission.reports) * fed.fraction_train), 1)
    grid.on_end = strategy.note_replies
    runner = with_privacy(strategy, fed, sampled)
    history.note_privacy(fed, sampled)
    # A resumed run's tracker goes on after the last round on record (and hides anything written past it).
    tracker = open_tracker(settings.tracker, history.out_dir, name=history.out_dir.name, config=settings.to_flat(),
                           first_step=start.round + 1 if start.evaluated else 0)
    try:
        runner.start(
            grid,
            ArrayRecord({k: v.cpu() for k, v in payload.items()}),
            num_rounds=fed.num_server_rounds - start.round,
            timeout=fed.round_timeout,
            train_config=admission.config(),
            evaluate_config=admission.config(),
            evaluate_fn=RoundEnd(session, history, strategy, admission, start, tracker),
        )
    finally:
        tracker.close()
    first, last = history.rounds[0], history.rounds[-1]
    log(INFO, "perplexity %.3f (round %d) -> %.3f (round %d); results in %s",
        first["perplexity"], first["round"], last["perplexity"], last["round"], history.out_dir)
    return history


def averaged_keys(model: MoPsModel, fed: FederatedConfig) -> list[str]:
    """What clients send back to be averaged: the experts and the gate, or the experts alone where gates are local."""
    local = fed.gate_aggregation == "local" and model.gate is not None
    return [k for k in model.federated_state_dict() if not (local and k.startswith(GATE_PREFIX))]


def open_session(settings: Settings, history: History, start: ResumePoint) -> Session:
    """The base, data and model, brought to where the run stands: its checkpoint after round N, else the start state."""
    session = Session.open(settings)
    if note := stale_note(cache_root(settings.model)):
        log(INFO, "%s", note)
    fingerprint = base_fingerprint(session.model.base)
    history.note_machine(start.round + 1, machine(settings.model))
    if start.round > 0:
        # The checkpoint holds the whole adapter, P1 included: the run goes on from it, not from the
        # start-state cache, whose entry other code (an upgrade) would compute anew and differently.
        saved = checkpoint.read(history.out_dir / "checkpoint")
        try:
            checkpoint.load_into(saved, session.model)
        except CheckpointError as exc:
            # Most often the same recipe pruned again on another CPU kind or library version: other
            # weights, on which the adapter scores far worse. Going on would tune another base, not
            # continue this run, so the run stops here and nothing on disk changes.
            raise ResumeError(f"cannot resume {history.out_dir} after round {start.round}: {exc} "
                              "Or start it afresh (resume = false, or another out-dir).") from None
        log(INFO, "resuming %s after round %d", history.out_dir, start.round)
    else:
        key, start_report = prepare_or_load(session)
        if start_report is not None:
            history.note_start_state(key, start_report.gate_train_accuracy)
    history.note_model(session.model, session.tasks, fingerprint)
    return session


def admit_nodes(grid: Grid, session: Session, history: History) -> Admission:
    """Every connected node admitted (its data, its base, the input prompts) once min-available-nodes are."""
    settings, model = session.settings, session.model
    sha = tensor_sha(model.input_prompts)
    store_input_prompts(settings, model.input_prompts, sha)  # a node sharing this cache needs no message
    fed = settings.federated
    admission = Admission(settings, session.tasks, base_fingerprint(model.base), model.input_prompts, sha, fed.round_timeout)
    discover(grid, admission, fed.min_available_nodes, fed.round_timeout)
    history.note_nodes(admission)
    names = admission.names()
    report.plot_partitions({r.partition_id if r.partition_id >= 0 else names[n]: r.task_counts for n, r in admission.reports.items()},
                           session.tasks, history.out_dir / "client_tasks.png")
    return admission


def discover(grid: Grid, admission: Admission, minimum: int, timeout: float) -> None:
    """Admit every connected node once `minimum` are connected.

    Stops with the reasons when fewer than `minimum` (min-available-nodes) can train: every round
    would wait for nodes that never come.
    """
    nodes = wait_for_nodes(grid, minimum, timeout)
    admitted = admission.admit(grid, nodes)
    if len(admitted) < minimum:
        nodes_by_reason: dict[str, list[int]] = {}  # a reason many nodes share is said once
        for node, reason in sorted({**admission.reasons, **admission.unanswered}.items()):
            nodes_by_reason.setdefault(reason.strip().splitlines()[-1] if reason.strip() else reason, []).append(node)
        why = "; ".join(f"node {', '.join(map(str, ns))}: {r}" for r, ns in nodes_by_reason.items())
        raise RuntimeError(f"only {len(admitted)} of the {len(nodes)} connected nodes can train and min-available-nodes "
                           f"is {minimum}: {why or 'no reply in time'}")
    unknown = admission.unknown_task_counts()
    if unknown:
        named = ", ".join(f"{t} ({n} records)" for t, n in sorted(unknown.items()))
        log(WARNING, "nodes hold tasks the run does not know; they train on them and the gate routes them: %s", named)
    log(INFO, "%d nodes hold %d training samples in all", len(admission.reports), admission.examples())


@dataclass
class RoundEnd:
    """What the server does with each round's average (Flower's evaluate_fn): install it, evaluate it on the
    test split, score greedy answers where due, checkpoint it, record the round and redraw the figures."""

    session: Session
    history: History
    strategy: MoPsFedAvg
    admission: Admission
    start: ResumePoint
    tracker: Tracker

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        number = self.strategy.round_number(server_round)
        if number == self.start.round and self.start.evaluated:  # a resumed run's starting point is on record
            return None
        session, history, model = self.session, self.history, self.session.model
        checkpoint.load_adapter_tensors(model, arrays.to_torch_state_dict(), source=f"round {number}", keys=model.federated_state_dict())
        started = time.perf_counter()
        result = session.evaluate(desc=f"eval round {number}")
        generated = time.perf_counter()
        generation = session.generation() if session.settings.federated.costly_scores_due(number) else None
        history.note_nodes(self.admission)  # nodes admitted since
        row = history.add_round(number, result, self.strategy.rounds.get(number), time.perf_counter() - started, generation)
        row["generation_seconds"] = time.perf_counter() - generated if generation else 0.0
        checkpoint.save(history.out_dir / "checkpoint", model, session.settings, list(session.tasks),
                        extra={"round": number, "metrics": {"perplexity": result.perplexity}})
        history.save()
        history.plot()
        report.plot_gate_heatmap(result, history.out_dir / "gate_heatmap.png", title=f"Mean gate score per task, round {number}")
        self.tracker.scalars(round_scalars(row), step=number)
        self.tracker.image("gate/heatmap", history.out_dir / "gate_heatmap.png", step=number)
        log(INFO, "%s", progress_line(row))
        return MetricRecord({"perplexity": result.perplexity, "loss": result.loss})
