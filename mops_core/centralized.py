"""A centralized run from settings to checkpoint: the flow `mops train` follows.

    session (base, model, data) -> start state (P1, experts, gate) -> eval -> train -> eval -> save
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from . import atomic, checkpoint, report, start_state
from .cache import stale_note
from .config import Settings
from .data import PreparedData, pad_token_id
from .evaluate import EvalResult, evaluate
from .loading import base_fingerprint, cache_root
from .model import MoPsModel
from .session import Session, sink_token_id
from .tracking import evaluation_scalars, generation_scalars, open_tracker
from .train import prompt_learning_rate

log = logging.getLogger(__name__)


def evaluate_plain_base(base, tokenizer, data: PreparedData, settings: Settings, *, progress: bool, desc: str) -> EvalResult:
    """Test perplexity of the base alone: a MoPs model without prompts and gate is exactly the HF model."""
    plain = settings.replace(method="prompt", prompts_per_expert=0, inject_layer=1)
    model = MoPsModel(base, plain.mops, sink_token_id(tokenizer)).to(base.device)
    model.compile_layers = settings.model.compile
    return evaluate(model, data.test, data.tasks, pad_id=pad_token_id(tokenizer), batch_size=plain.train.eval_batch_size,
                    max_samples=plain.train.eval_samples, progress=progress, desc=desc)


def run(settings: Settings, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train MoPs (or the baseline) centrally and write checkpoint, results and figures to `out_dir`."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    session = Session.open(settings, progress=progress)
    settings = session.settings  # with `experts` resolved for the data's tasks
    data, model = session.data, session.model
    log.info("data: %d train / %d test examples over %d tasks", len(data.train), len(data.test), len(data.tasks))
    if note := stale_note(cache_root(settings.model)):
        log.info("%s", note)
    start = start_state.prepare(session, progress=progress)
    tracker = open_tracker(settings.tracker, out_dir, name=out_dir.name, config=settings.to_flat())
    try:
        before = session.evaluate(progress=progress, desc="eval (start)")
        tracker.scalars(evaluation_scalars(before), step=0)
        rates = {"lr/prompts": prompt_learning_rate(model, settings.train),
                 "lr/gate": settings.train.lr * settings.train.gate_lr_scale if model.gate is not None else None}

        def on_step(step: int, loss: float) -> None:  # step 1 is the first optimizer step, as in the loss curve
            tracker.scalars({"train/loss": loss, **rates}, step=step + 1)

        train_started = time.perf_counter()
        stats = session.train(data.train, settings.train.steps, seed=settings.train.seed, progress=progress,
                              desc=f"{settings.mops.method} training", on_step=on_step)
        train_seconds = time.perf_counter() - train_started
        after = session.evaluate(progress=progress, desc="eval (end)")
        generation = session.generation(progress=progress)
        tracker.scalars({**evaluation_scalars(after), **generation_scalars(generation)}, step=stats.steps)
        report.plot_gate_heatmap(after, out_dir / "gate_heatmap.png")
        tracker.image("gate/heatmap", out_dir / "gate_heatmap.png", step=stats.steps)
    finally:
        tracker.close()

    results = {
        "settings": settings.to_flat(),
        "tasks": list(data.tasks),
        "base_fingerprint": base_fingerprint(session.base),
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "prompt_lr": prompt_learning_rate(model, settings.train),
        "start": {"input_prompt_loss": start.input_prompt_loss, "gate_train_accuracy": start.gate_train_accuracy},
        "before": before.to_dict(),
        "after": after.to_dict(),
        "generation": generation.to_dict() if generation else None,
        "train": {"steps": stats.steps, "mean_loss": stats.mean_loss, "seconds": train_seconds, "losses": stats.losses},
        "wall_seconds": time.perf_counter() - started,
    }
    checkpoint.save(
        out_dir / "checkpoint", model, settings, list(data.tasks),
        extra={"step": stats.steps, "metrics": {"perplexity": after.perplexity, "perplexity_start": before.perplexity}},
    )
    atomic.write_json(out_dir / "results.json", results)
    report.plot_curve(
        {"training loss": stats.losses}, out_dir / "loss.png", xlabel="step", ylabel="loss (response tokens)",
        title=f"{settings.mops.method} on {settings.data.dataset}", smooth=min(20, max(1, stats.steps // 10)),
    )
    report.print_eval(after, title=f"{settings.mops.method}: test perplexity", before=before)
    if generation is not None:
        report.console.print(report.generation_table(generation))
    log.info("wrote %s", out_dir)
    return results
