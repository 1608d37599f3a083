"""`mops`: train and evaluate MoPs centrally from the command line.

    mops train --dataset dolly --method mops --steps 300 --out runs/dolly-mops
    mops eval runs/dolly-mops/checkpoint

Every setting of `mops_core.config` is a `--kebab-case` flag; `--config FILE.toml` reads a
TOML table of the same keys first (flags win).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tomllib
from pathlib import Path

from . import checkpoint, report
from .config import CONCERNS, FederatedConfig, Settings
from .settings import SettingsError, add_cli_flags, cli_values


def _settings_from_args(args: argparse.Namespace, base: Settings | None = None) -> Settings:
    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        try:
            table = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read settings file {path}: {exc}") from None
        values.update(table.get("tool", {}).get("flwr", {}).get("app", {}).get("config", table))
    for cls in CONCERNS.values():
        values.update(cli_values(args, cls))
    if base is None:
        return Settings.from_flat(values, context="the command line")
    return base.replace(**values)


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file with settings (a [tool.flwr.app.config] table or flat keys)")
    for cls in CONCERNS.values():
        if cls is not FederatedConfig:  # federated runs are configured through `flwr run`
            add_cli_flags(parser, cls)


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()


def cmd_train(args: argparse.Namespace) -> int:
    from .centralized import run

    settings = _settings_from_args(args)
    out = Path(args.out or f"runs/{settings.data.dataset}-{settings.mops.method}")
    run(settings, out, progress=not args.no_progress)
    report.console.print(f"checkpoint: {out / 'checkpoint'}  results: {out / 'results.json'}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from rich.table import Table

    from . import atomic
    from .centralized import evaluate_plain_base
    from .compression.pipeline import compress_base
    from .data import prepare
    from .loading import load_base

    settings = _settings_from_args(args)
    if settings.compression.compression == "none":
        raise SettingsError("setting 'compression': say what to do, e.g. --compression sparsegpt:0.5")
    progress = not args.no_progress
    base, tokenizer = load_base(settings.model)
    data = prepare(settings.data, tokenizer)
    before = evaluate_plain_base(base, tokenizer, data, settings, progress=progress, desc="eval (dense)")
    compression = compress_base(base, tokenizer, settings, progress=progress)
    after = evaluate_plain_base(base, tokenizer, data, settings, progress=progress, desc="eval (compressed)")

    if compression.stats:
        table = Table(title=f"{settings.compression.compression}: sparsity per decoder layer")
        table.add_column("layer", justify="right")
        table.add_column("sparsity", justify="right")
        for layer, sparsity in compression.per_layer().items():
            table.add_row(str(layer), f"{sparsity:.4f}")
        report.console.print(table)
    where = "from the cache" if compression.from_cache else "computed now"
    report.console.print(
        f"{settings.compression.compression} ({compression.backend or where}): "
        f"overall sparsity {compression.sparsity:.4f}, {compression.seconds:.0f} s ({where})\n"
        f"test perplexity on {after.samples} samples: dense {before.perplexity:.3f} -> compressed {after.perplexity:.3f}"
    )
    if args.out:
        atomic.write_json(Path(args.out) / "compression.json", {
            "compression": settings.compression.compression, "seconds": compression.seconds,
            "from_cache": compression.from_cache, "sparsity": compression.sparsity,
            "per_layer": compression.per_layer(), "perplexity_dense": before.perplexity,
            "perplexity_compressed": after.perplexity, "per_task_dense": before.to_dict()["per_task"],
            "per_task_compressed": after.to_dict()["per_task"],
        })
    return 0


def resolve_checkpoint(path: str) -> Path:
    """Accept the checkpoint directory or the run directory that holds it."""
    candidate = Path(path)
    if not (candidate / checkpoint.CONFIG_FILE).exists() and (candidate / "checkpoint" / checkpoint.CONFIG_FILE).exists():
        return candidate / "checkpoint"
    return candidate


def cmd_eval(args: argparse.Namespace) -> int:
    from . import atomic
    from .centralized import build_model, evaluate_test
    from .compression.pipeline import prepare_base
    from .data import pad_token_id, prepare

    ckpt = checkpoint.read(resolve_checkpoint(args.checkpoint))
    settings = _settings_from_args(args, base=ckpt.settings)
    base, tokenizer = prepare_base(settings, progress=not args.no_progress)
    model = build_model(settings, base, tokenizer)
    checkpoint.load_into(ckpt, model)
    data = prepare(settings.data, tokenizer)
    result = evaluate_test(model, data, settings, pad_id=pad_token_id(tokenizer), progress=not args.no_progress, desc="eval")
    report.print_eval(result, title=f"{ckpt.path}: test perplexity")
    out = Path(args.out) if args.out else ckpt.path.parent
    atomic.write_json(out / "eval.json", result.to_dict())
    heatmap = report.plot_gate_heatmap(result, out / "gate_heatmap.png")
    report.console.print(f"wrote {out / 'eval.json'}" + (f" and {heatmap}" if heatmap else ""))
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that describe bad input; anything else is a bug and keeps its traceback."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loading import ModelLoadError
    from .compression.pipeline import CompressionCacheError
    from .start_state import StartStateError
    from .train import TrainingError

    return (SettingsError, DataError, ModelLoadError, CheckpointError, TrainingError, CompressionCacheError, StartStateError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mops", description="Mixture of Prompts on compressed LLaMA-family models")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train MoPs or the prompt-tuning baseline centrally")
    train.add_argument("--out", help="run directory (default runs/<dataset>-<method>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_settings(train)
    train.set_defaults(func=cmd_train)

    comp = sub.add_parser("compress", help="compress the base (cached), report sparsity and test perplexity before/after")
    comp.add_argument("--out", help="also write compression.json there")
    comp.add_argument("--no-progress", action="store_true")
    _add_settings(comp)
    comp.set_defaults(func=cmd_compress)

    ev = sub.add_parser("eval", help="test perplexity per task and the gate's expert shares of a checkpoint")
    ev.add_argument("checkpoint", help="checkpoint directory (or the run directory holding checkpoint/)")
    ev.add_argument("--out", help="where eval.json and gate_heatmap.png go (default: beside the checkpoint)")
    ev.add_argument("--no-progress", action="store_true")
    _add_settings(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    user_errors = _user_errors()
    try:
        return args.func(args)
    except user_errors as exc:
        report.console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
