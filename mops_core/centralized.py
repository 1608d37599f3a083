"""A centralized run from settings to checkpoint: the flow `mops train` follows.

    load base -> data -> MoPs model -> start state (P1, prompts, gate) -> eval -> train -> eval -> save

`build_model` and `prepare_start_state` are shared with the federated server, which prepares
the same start state before round 1.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import atomic, checkpoint, report
from .activations import ActivationCache, tokenizer_identity
from .compression.pipeline import prepare_base
from .config import Settings
from .data import PreparedData, pad_token_id, prepare
from .evaluate import EvalResult, evaluate
from .loading import base_fingerprint, cache_root
from .model import MoPsModel
from .train import GateRegulariser, make_mops_optimizer, pretrain_gate, pretrain_input_prompts, train_steps

log = logging.getLogger(__name__)


def sink_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if sink is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to use as the attention sink")
    return sink


def build_model(settings: Settings, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> MoPsModel:
    torch.manual_seed(settings.train.seed)
    model = MoPsModel(base, settings.mops, sink_token_id(tokenizer)).to(base.device)
    train = settings.train
    # P1's starting point (pretraining or a loaded start state replaces it); here because the text init needs the tokenizer.
    text_ids = tokenizer(train.input_prompt_text, add_special_tokens=False)["input_ids"] if train.input_prompt_init == "text" else None
    model.init_input_prompts(torch.Generator().manual_seed(train.seed), text_ids)
    if train.activation_cache:
        model.activation_cache = ActivationCache(
            model, tokenizer_identity(tokenizer), directory=cache_root(settings.model) / "activations",
            memory_mb=train.activation_cache_mb, disk_mb=train.activation_cache_disk_mb,
        )
    return model


@dataclass
class StartState:
    input_prompt_loss: float
    gate_train_accuracy: float | None


def prepare_start_state(
    model: MoPsModel, data: PreparedData, settings: Settings, *, pad_id: int, progress: bool = True
) -> StartState:
    """Input prompts (as `build_model` started them) tuned and frozen, prompts from them, gate pretrained."""
    stats = pretrain_input_prompts(model, data.train, settings.train, pad_id=pad_id, progress=progress)
    accuracy = pretrain_gate(model, data.train, settings.train, pad_id=pad_id, progress=progress)
    return StartState(stats.mean_loss, accuracy)


def evaluate_test(model: MoPsModel, data: PreparedData, settings: Settings, *, pad_id: int, progress: bool, desc: str) -> EvalResult:
    return evaluate(
        model, data.test, data.tasks, pad_id=pad_id, batch_size=settings.train.eval_batch_size,
        max_samples=settings.train.eval_samples, progress=progress, desc=desc,
    )


def evaluate_plain_base(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, data: PreparedData, settings: Settings, *, progress: bool, desc: str
) -> EvalResult:
    """Test perplexity of the base alone: a MoPs model without prompts and gate is exactly the HF model."""
    plain = settings.replace(method="prompt", prompts_per_expert=0, inject_layer=1)
    model = MoPsModel(base, plain.mops, sink_token_id(tokenizer)).to(base.device)
    return evaluate_test(model, data, plain, pad_id=pad_token_id(tokenizer), progress=progress, desc=desc)


def load_tuned(path: str | Path, overrides: dict | None = None, *, progress: bool = True):
    """A checkpoint's model, ready to use: its (compressed) base, rebuilt and checked against it.

    Returns (model, tokenizer, settings, checkpoint). `overrides` changes settings that do not
    shape the model (data-dir, eval-samples, model-cache-dir, device, ...).
    """
    ckpt = checkpoint.read(path)
    settings = ckpt.settings.replace(**(overrides or {}))
    base, tokenizer = prepare_base(settings, progress=progress)
    model = build_model(settings, base, tokenizer)
    checkpoint.load_into(ckpt, model)
    return model, tokenizer, settings, ckpt


def run(settings: Settings, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train MoPs (or the baseline) centrally and write checkpoint, results and figures to `out_dir`."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    base, tokenizer = prepare_base(settings, progress=progress)
    data = prepare(settings.data, tokenizer)
    pad_id = pad_token_id(tokenizer)
    log.info("data: %d train / %d test examples over %d tasks", len(data.train), len(data.test), len(data.tasks))
    model = build_model(settings, base, tokenizer)
    start = prepare_start_state(model, data, settings, pad_id=pad_id, progress=progress)
    before = evaluate_test(model, data, settings, pad_id=pad_id, progress=progress, desc="eval (start)")

    optimizer = make_mops_optimizer(model, settings.train)
    train_started = time.perf_counter()
    stats = train_steps(
        model, data.train, settings.train.steps, optimizer, pad_id=pad_id, batch_size=settings.train.batch_size,
        seed=settings.train.seed, desc=f"{settings.mops.method} training", progress=progress,
        regulariser=GateRegulariser.from_config(settings.train),
    )
    train_seconds = time.perf_counter() - train_started
    after = evaluate_test(model, data, settings, pad_id=pad_id, progress=progress, desc="eval (end)")

    results = {
        "settings": settings.to_flat(),
        "tasks": list(data.tasks),
        "base_fingerprint": base_fingerprint(base),
        "trainable_parameters": sum(p.numel() for p in model.trainable_parameters()),
        "prompt_lr": optimizer.param_groups[0]["lr"],
        "start": {"input_prompt_loss": start.input_prompt_loss, "gate_train_accuracy": start.gate_train_accuracy},
        "before": before.to_dict(),
        "after": after.to_dict(),
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
    report.plot_gate_heatmap(after, out_dir / "gate_heatmap.png")
    report.print_eval(after, title=f"{settings.mops.method}: test perplexity", before=before)
    log.info("wrote %s", out_dir)
    return results
