"""ServerApp: federated MoPs (or FedPrompt) over many non-i.i.d. clients.

    settings -> base, data, model -> start state (P1 pretrained, prompts, gate pretrained)
             -> admit every node (its partition, its base; P1 sent where lacking) -> rounds of MoPsFedAvg
             -> after each round: evaluate on the test split, checkpoint, results.json, figures

Everything heavy lives in `mops_core`; this file only wires it to Flower's Message API.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import torch  # noqa: F401  -- before ArrayRecord.to_torch_state_dict()
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from mops_core import checkpoint, log_through, report
from mops_core.config import FederatedConfig, Settings
from mops_core.cache import stale_note
from mops_core.loading import base_fingerprint, cache_root, machine
from mops_core.session import Session
from mops_core.start_state import prepare_or_load, store_input_prompts, tensor_sha

from .admission import Admission
from .history import History, progress_line
from .privacy import with_privacy
from .strategy import MoPsFedAvg, wait_for_nodes

log_through(FLOWER_LOGGER)  # start-up costs (compiling, dequantising) and fallbacks, in the run's log

app = ServerApp()


def discover(grid: Grid, admission: Admission, minimum: int, timeout: float) -> None:
    """Admit every connected node (its data, its base, the input prompts) once `minimum` are connected.

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
    reports = admission.reports.values()
    log(INFO, "%d nodes hold %d training samples in all", len(reports), sum(r["num-examples"] for r in reports))


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
    if note := stale_note(cache_root(settings.model)):
        log(INFO, "%s", note)
    fingerprint = base_fingerprint(model.base)
    history.note_machine(max(done, 0) + 1, machine(settings.model))
    if done > 0:
        # The checkpoint holds the whole adapter, P1 included: the run goes on from it, not from the
        # start-state cache, whose entry other code (an upgrade) would compute anew and differently.
        saved = checkpoint.read(out / "checkpoint")
        if saved.config.get("base_fingerprint") != fingerprint:
            # The settings are the run's own (History.open checked them): the same recipe compressed
            # again, on another machine or by other library versions. Refusing would strand a run
            # that took hours; going on is honest only if the record says so.
            log(WARNING, "resuming %s on a base with fingerprint %s; rounds 1-%d ran on %s. The same settings compressed "
                "it again (another machine or library version): results.json records the change", out, fingerprint, done,
                saved.config.get("base_fingerprint"))
            history.note_base_change(done + 1, saved.config.get("base_fingerprint"), fingerprint)
        checkpoint.load_into(saved, model, fingerprint=False)
        log(INFO, "resuming %s after round %d", out, done)
    else:
        key, start_report = prepare_or_load(session)
        if start_report is not None:
            history.info["start_state"] = {"key": key, "gate_train_accuracy": start_report.gate_train_accuracy}
    sha = tensor_sha(model.input_prompts)

    tasks = session.tasks
    store_input_prompts(settings, model.input_prompts, sha)  # a node sharing this cache needs no message
    admission = Admission(settings, tasks, fingerprint, model.input_prompts, sha, fed.round_timeout)
    discover(grid, admission, fed.min_available_nodes, fed.round_timeout)
    history.info.update(admission.info())
    names = admission.names()
    report.plot_partitions({r["partition-id"] if r["partition-id"] >= 0 else names[n]: r["task-counts"] for n, r in admission.reports.items()},
                           tasks, out / "client_tasks.png")
    payload = model.federated_state_dict()
    history.info.update(
        trainable_parameters=sum(p.numel() for p in model.trainable_parameters()),
        message_parameters=sum(t.numel() for t in payload.values()),
        tasks=list(tasks),
        base_fingerprint=fingerprint,
        base_parameters=sum(p.numel() for p in model.base.parameters()),
    )
    strategy = MoPsFedAvg(
        {k: tuple(v.shape) for k, v in payload.items()},
        seed=settings.train.seed,
        admission=admission,
        round_offset=max(done, 0),
        fraction_train=fed.fraction_train,
        min_available_nodes=fed.min_available_nodes,
        expert_weighting=fed.expert_aggregation if model.gate is not None else "examples",
        wait_timeout=fed.round_timeout,
        fraction_evaluate=fed.fraction_evaluate,
        tasks=list(tasks),
        norm_bound=fed.norm_bound,
    )
    sampled = max(int(len(admission.reports) * fed.fraction_train), 1)
    runner = with_privacy(strategy, fed, sampled)
    if runner is not strategy:
        history.info["privacy"] = {"clipping": fed.dp_clipping, "clip": fed.dp_clip, "noise_multiplier": fed.dp_noise,
                                   "clients_per_round": sampled, "noise_std": fed.dp_noise * fed.dp_clip / sampled}

    def after_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        number = strategy.round_number(server_round)
        if number <= done:  # a resumed run's starting point was evaluated before
            return None
        checkpoint.load_adapter_tensors(model, arrays.to_torch_state_dict(), source=f"round {number}", keys=payload)
        started = time.perf_counter()
        result = session.evaluate(desc=f"eval round {number}")
        generated = time.perf_counter()
        generation = session.generation() if scores_text(number, fed) else None
        history.info.update(admission.info())  # nodes admitted since
        row = history.add_round(number, result, strategy.rounds.get(number), time.perf_counter() - started, generation)
        row["generation_seconds"] = time.perf_counter() - generated if generation else 0.0
        checkpoint.save(out / "checkpoint", model, session.settings, list(tasks), extra={"round": number, "metrics": {"perplexity": result.perplexity}})
        history.save()
        history.plot()
        report.plot_gate_heatmap(result, out / "gate_heatmap.png", title=f"Mean gate score per task, round {number}")
        log(INFO, "%s", progress_line(row))
        return MetricRecord({"perplexity": result.perplexity, "loss": result.loss})

    runner.start(
        grid,
        ArrayRecord({k: v.cpu() for k, v in payload.items()}),
        num_rounds=fed.num_server_rounds - max(done, 0),
        timeout=fed.round_timeout,
        train_config=admission.config(),
        evaluate_config=admission.config(),
        evaluate_fn=after_round,
    )
    first, last = history.rounds[0], history.rounds[-1]
    log(INFO, "perplexity %.3f (round %d) -> %.3f (round %d); results in %s", first["perplexity"], first["round"], last["perplexity"], last["round"], out)
    return history

