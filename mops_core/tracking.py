"""A run's metrics where researchers watch them while it runs: TensorBoard (the default), Weights &
Biases (optional), or nowhere. Trackers write what the run already records (results.json stays the
record); they change no number.

    tracker = open_tracker(settings.tracker, out_dir, name="...", first_step=0)
    tracker.scalars({"test/perplexity": 12.3}, step=1)
    tracker.close()

A run resumed after step N opens its tracker with `first_step=N + 1`: TensorBoard then hides what
an earlier process wrote from that step on (its `purge_step`), so that a resumed curve goes on
without repeated steps.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import TrackingConfig

log = logging.getLogger(__name__)


class Tracker:
    """The tracker of `tracking = "none"`: it writes nothing. The others write the same calls."""

    directory: Path | None = None

    def scalars(self, values: Mapping[str, float | int | None], step: int) -> None:
        pass

    def image(self, tag: str, path: Path, step: int) -> None:
        """A figure the run drew as a PNG (the gate heatmap), under `tag` at `step`."""

    def text(self, tag: str, text: str) -> None:
        pass

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float | None]) -> None:
        """One run's settings and final numbers, for the view that compares runs in a table."""

    def close(self) -> None:
        pass


def finite(values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers among `values`: None, NaN and infinities are left out (a round without clients' scores)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def evaluation_scalars(result: Any, prefix: str = "test") -> dict[str, float | None]:
    """An evaluation (`evaluate.EvalResult`) as tracker scalars: perplexity overall and per task, the gate's
    entropy and routing. Read by attribute: this module loads no model code."""
    values: dict[str, float | None] = {f"{prefix}/perplexity": result.perplexity, f"{prefix}/loss": result.loss}
    values.update({f"{prefix}/perplexity/{task}": score.perplexity for task, score in result.per_task.items()})
    values.update({"gate/entropy": result.gate_entropy, "gate/routing_accuracy": result.routing_accuracy})
    return values


def generation_scalars(generation: Any) -> dict[str, float | None]:
    """ROUGE-L and exact match of greedy answers (`metrics.GenerationResult`), where scored."""
    if generation is None:
        return {}
    return {"text/rouge_l": generation.overall.rouge_l, "text/exact_match": generation.overall.exact_match}


def settings_text(flat: Mapping[str, Any]) -> str:
    """The run's settings as TensorBoard shows text (Markdown): one `key = value` line each, as code."""
    return "\n".join(f"    {key} = {value!r}" for key, value in flat.items())


def hparam_value(value: Any) -> str | float | int | bool:
    return value if isinstance(value, (str, int, float, bool)) else str(value)


class TensorBoard(Tracker):
    def __init__(self, directory: Path, first_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        self.writer = SummaryWriter(str(directory), purge_step=first_step, flush_secs=30)

    def scalars(self, values: Mapping[str, float | int | None], step: int) -> None:
        for tag, value in finite(values).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()  # a round or an evaluation is minutes apart: show it now

    def image(self, tag: str, path: Path, step: int) -> None:
        import matplotlib.image

        if Path(path).exists():
            self.writer.add_image(tag, matplotlib.image.imread(str(path))[..., :3], step, dataformats="HWC")

    def text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text, 0)

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float | None]) -> None:
        # Into the run's own folder (run_name "."), so that each run is one row of the table beside its curves.
        self.writer.add_hparams({k: hparam_value(v) for k, v in params.items()}, finite(metrics), run_name=".")

    def close(self) -> None:
        self.writer.close()


class Wandb(Tracker):
    """Weights & Biases, offline unless WANDB_MODE says otherwise (no account, no network: `wandb sync` later)."""

    def __init__(self, wandb: Any, directory: Path, name: str, config: Mapping[str, Any], first_step: int | None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.wandb = wandb
        self.first_step = first_step or 0
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "mops-fl"), name=name, dir=str(directory),
                              config=dict(config), mode=os.environ.get("WANDB_MODE", "offline"), reinit=True)

    def scalars(self, values: Mapping[str, float | int | None], step: int) -> None:
        if step >= self.first_step:  # a resumed run's earlier steps are on record already
            self.run.log(finite(values), step=step)

    def image(self, tag: str, path: Path, step: int) -> None:
        if Path(path).exists() and step >= self.first_step:
            self.run.log({tag: self.wandb.Image(str(path))}, step=step)

    def text(self, tag: str, text: str) -> None:
        self.run.summary[tag] = text

    def hparams(self, params: Mapping[str, Any], metrics: Mapping[str, float | None]) -> None:
        self.run.config.update({k: hparam_value(v) for k, v in params.items()}, allow_val_change=True)
        self.run.summary.update(finite(metrics))

    def close(self) -> None:
        self.run.finish()


def tracker_dir(cfg: TrackingConfig, out_dir: Path) -> Path:
    """Where the tracker writes: `tracking-dir`, or the run's output folder's tensorboard/ (or wandb/)."""
    return Path(cfg.tracking_dir).expanduser() if cfg.tracking_dir else Path(out_dir) / cfg.tracking


def open_tracker(cfg: TrackingConfig, out_dir: Path, *, name: str, config: Mapping[str, Any] | None = None,
                 first_step: int | None = 0) -> Tracker:
    """The run's tracker; `first_step`: the first step this process writes (a resumed run's next).

    Given the run's flat settings (`config`), it records them as the run's settings text too.
    """
    tracker = _new_tracker(cfg, out_dir, name=name, config=config, first_step=first_step)
    if config:
        tracker.text("settings", settings_text(config))
    return tracker


def _new_tracker(cfg: TrackingConfig, out_dir: Path, *, name: str, config: Mapping[str, Any] | None,
                 first_step: int | None) -> Tracker:
    if cfg.tracking == "none":
        return Tracker()
    directory = tracker_dir(cfg, out_dir)
    if cfg.tracking == "wandb":
        try:
            import wandb
        except ImportError:
            log.warning("tracking = 'wandb', but wandb is not installed (pip install wandb): this run is not tracked")
            return Tracker()
        return Wandb(wandb, directory, name, config or {}, first_step)
    return TensorBoard(directory, first_step)
