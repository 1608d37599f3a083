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


def resolve_checkpoint(path: str) -> Path:
    """Accept the checkpoint directory or the run directory that holds it."""
    candidate = Path(path)
    if not (candidate / checkpoint.CONFIG_FILE).exists() and (candidate / "checkpoint" / checkpoint.CONFIG_FILE).exists():
        return candidate / "checkpoint"
    return candidate


def cmd_eval(args: argparse.Namespace) -> int:
    from . import atomic
    from .centralized import build_model, evaluate_test
    from .data import pad_token_id, prepare
    from .loading import load_base

    ckpt = checkpoint.read(resolve_checkpoint(args.checkpoint))
    settings = _settings_from_args(args, base=ckpt.settings)
    base, tokenizer = load_base(settings.model)
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
    from .train import TrainingError

    return (SettingsError, DataError, ModelLoadError, CheckpointError, TrainingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mops", description="Mixture of Prompts on compressed LLaMA-family models")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train MoPs or the prompt-tuning baseline centrally")
    train.add_argument("--out", help="run directory (default runs/<dataset>-<method>)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_settings(train)
    train.set_defaults(func=cmd_train)

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
