"""`mops`: train and evaluate MoPs centrally from the command line.

    mops train --dataset dolly --method mops --steps 300 --out runs/dolly-mops
    mops eval runs/dolly-mops/checkpoint

Every setting of `mops_core.config` is a `--kebab-case` flag; `--config FILE.toml` reads a
TOML table of the same keys first (flags win).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tomllib
from pathlib import Path

from . import checkpoint, report
from .config import CONCERNS, FederatedConfig, ModelConfig, Settings
from .parsing import SettingsError, add_cli_flags, cli_values


def _flag_values(args: argparse.Namespace) -> dict:
    """Settings the user gave: a --config TOML table first, then flags (which win)."""
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
    return values


def _settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_flat(_flag_values(args), context="the command line")


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
    name = Path(settings.data.dataset.rstrip("/")).stem or "data"  # a preset's name, or a file's, folder's or hub id's
    out = Path(args.out or f"runs/{name}-{settings.mops.method}")
    run(settings, out, progress=not args.no_progress)
    report.console.print(f"checkpoint: {out / 'checkpoint'}  results: {out / 'results.json'}")
    return 0


def cmd_compress(args: argparse.Namespace) -> int:
    from rich.table import Table

    from . import atomic
    from .centralized import evaluate_plain_base
    from .compression.pipeline import check_exportable, compress_base, export_base
    from .data import prepare
    from .loading import base_fingerprint, load_base

    settings = _settings_from_args(args)
    if settings.compression.compression == "none":
        raise SettingsError("setting 'compression': say what to do, e.g. --compression sparsegpt:0.5")
    if args.export:
        check_exportable(settings)
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
        f"overall sparsity {compression.sparsity:.4f}, {compression.seconds:.0f} s ({where}); "
        f"base fingerprint {base_fingerprint(base)}\n"
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
    if args.export:
        fingerprint = export_base(base, tokenizer, settings, Path(args.export))
        report.console.print(f"exported to {args.export}: nodes load it with model = \"{args.export}\" (fingerprint {fingerprint})",
                             soft_wrap=True, highlight=False)
    return 0


def resolve_checkpoint(path: str) -> Path:
    """Accept the checkpoint directory or the run directory that holds it."""
    candidate = Path(path)
    if not (candidate / checkpoint.CONFIG_FILE).exists() and (candidate / "checkpoint" / checkpoint.CONFIG_FILE).exists():
        return candidate / "checkpoint"
    return candidate


def _load_tuned(args: argparse.Namespace):
    """(session, checkpoint) of the checkpoint argument; flags override its settings."""
    from .session import Session

    return Session.from_checkpoint(resolve_checkpoint(args.checkpoint), _flag_values(args), progress=not args.no_progress)


def cmd_eval(args: argparse.Namespace) -> int:
    from . import atomic

    session, ckpt = _load_tuned(args)
    result = session.evaluate(progress=not args.no_progress, desc="eval")
    report.print_eval(result, title=f"{ckpt.path}: test perplexity")
    generation = session.generation(progress=not args.no_progress)
    if generation is not None:
        report.console.print(report.generation_table(generation))
    out = Path(args.out) if args.out else ckpt.path.parent
    atomic.write_json(out / "eval.json", {**result.to_dict(), "generation": generation.to_dict() if generation else None})
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


def _read_questions(path: Path) -> list[dict]:
    """JSONL of {"instruction": ..., "context" or "input": ...}; a bad line is named."""
    from .data import read_jsonl

    return read_jsonl(path, ("instruction",))


def cmd_generate(args: argparse.Namespace) -> int:
    import json

    import torch
    from tqdm.auto import tqdm

    from . import atomic
    from .generate import Generator

    if bool(args.instruction) == bool(args.input_file):
        raise SettingsError("give either an instruction or --input-file")
    if args.input_file and not args.output:
        raise SettingsError("--input-file needs --output (a JSONL file for the answers)")
    questions = _read_questions(Path(args.input_file)) if args.input_file else None
    session, ckpt = _load_tuned(args)
    generator = Generator(session.model, session.formatter, session.tokenizer.eos_token_id, session.pad_id)
    options = {"max_new_tokens": session.settings.train.max_new_tokens, "do_sample": args.sample, "temperature": args.temperature, "top_p": args.top_p}
    if args.sample_seed is not None:
        torch.manual_seed(args.sample_seed)
    tasks = ckpt.tasks

    def experts(answer) -> str:
        names = lambda e: f"E{e}" + (f" ({tasks[e]})" if e < len(tasks) else "")  # noqa: E731 - expert i was pretrained on task i
        return ", ".join(f"{names(e)} {score:.2f}" for e, score in answer.top_experts())

    if questions is None:
        answer = generator.answer(args.instruction, args.input or "", **options)
        report.console.print(answer.text, markup=False, highlight=False, soft_wrap=True)
        if answer.gate is not None:
            report.console.print(f"[dim]experts: {experts(answer)}[/dim]")
        return 0
    lines = []
    for row in tqdm(questions, desc="answering", disable=args.no_progress):
        answer = generator.answer(row["instruction"], row.get("context", row.get("input", "")), **options)
        lines.append(json.dumps({**row, "answer": answer.text, "gate": answer.gate, "new_tokens": len(answer.token_ids)}))
    atomic.write_bytes(args.output, ("\n".join(lines) + "\n").encode())
    report.console.print(f"wrote {len(lines)} answers to {args.output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .evaluate import gate_shares

    session, ckpt = _load_tuned(args)
    model, settings = session.model, session.settings
    adapter = model.adapter_state_dict()
    counts = {
        "experts (prompts)": adapter["prompts"].numel(),
        "gate": sum(v.numel() for k, v in adapter.items() if k.startswith("gate.")),
        "input prompts (frozen)": adapter["input_prompts"].numel(),
        "base (frozen)": sum(p.numel() for p in model.base.parameters()),
    }
    table = Table(title=f"{ckpt.path}")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("base_model_name_or_path", "gating", "num_experts", "prompts_per_expert", "inject_layer", "round", "step"):
        if key in ckpt.config:
            table.add_row(key, str(ckpt.config[key]))
    table.add_row("compression", settings.compression.compression)
    trainable = counts["experts (prompts)"] + counts["gate"]
    for name, count in counts.items():
        table.add_row(f"parameters: {name}", f"{count:,}")
    table.add_row("trained share of the base", f"{trainable / counts['base (frozen)']:.4%}")
    report.console.print(table)
    if model.gate is None:
        return 0
    data = session.data
    examples = data.test if args.split == "test" else data.train
    if settings.train.eval_samples:
        examples = examples[: settings.train.eval_samples]
    shares = gate_shares(model, examples, data.tasks, pad_id=session.pad_id, batch_size=settings.train.eval_batch_size)
    report.console.print(report.gate_matrix_table(shares.tasks, shares.matrix, shares.entropy, shares.routing_accuracy))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .config import CONCERNS, DEMO, settings_markdown
    from .parsing import describe

    if args.markdown:
        sys.stdout.write(settings_markdown())
        return 0
    table = Table(title="settings (demo: the value pyproject.toml runs `flwr run .` with, where it differs)")
    for column in ("concern", "setting", "default", "demo", "what it does"):
        table.add_column(column, overflow="fold")
    for row in describe(CONCERNS, DEMO):
        table.add_row(*row)
    report.console.print(table)
    return 0


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def cmd_cache(args: argparse.Namespace) -> int:
    import time

    from rich.table import Table

    from . import cache
    from .loading import cache_root

    root = cache_root(_settings_from_args(args).model)
    now = time.time()

    def days(entry: cache.Entry) -> str:
        return f"{(now - entry.last_used) / 86400:.1f}"

    if args.action == "prune":
        if args.unused_days is None:
            raise SettingsError("mops cache prune needs --unused-days N (0 deletes every entry not in use)")
        deleted, busy = cache.prune(root, args.unused_days * 86400, dry_run=args.dry_run, now=now)
        verb = "would delete" if args.dry_run else "deleted"
        for entry in deleted:
            report.console.print(f"{verb} {entry.path} ({_size(entry.bytes)}, unused for {days(entry)} days)", highlight=False, soft_wrap=True)
        for entry in busy:
            report.console.print(f"kept {entry.path}: another process holds its lock", highlight=False, soft_wrap=True)
        report.console.print(f"{verb} {len(deleted)} entries, {_size(sum(e.bytes for e in deleted))}, under {root}", highlight=False, soft_wrap=True)
        return 0

    found = cache.entries(root)
    table = Table(title=f"the cache at {root}")
    for column in ("kind", "what", "entries", "size", "last used (days ago)"):
        table.add_column(column)
    for kind, what in cache.KINDS.items():
        mine = [e for e in found if e.kind == kind and not e.unfinished]
        used = f"{days(mine[-1])} … {days(mine[0])}" if mine else ""
        table.add_row(kind, what, str(len(mine)), _size(sum(e.bytes for e in mine)), used)
    unfinished = [e for e in found if e.unfinished]
    if unfinished:
        table.add_row("unfinished", "writes never completed (an hour on: their process died)", str(len(unfinished)), _size(sum(e.bytes for e in unfinished)), "")
    report.console.print(table)
    report.console.print("`mops cache prune --unused-days N` deletes the entries no run has used for N days", highlight=False)
    if args.entries:
        for entry in found:
            report.console.print(f"{days(entry):>7}  {_size(entry.bytes):>11}  {entry.path}", highlight=False, soft_wrap=True)
    return 0


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
    comp.add_argument("--export", metavar="DIR", help="also write the compressed base to DIR, a Hugging Face model that "
                      "federated nodes load with model = DIR (compressed already, the server's fingerprint)")
    comp.add_argument("--no-progress", action="store_true")
    _add_settings(comp)
    comp.set_defaults(func=cmd_compress)

    gen = sub.add_parser("generate", help="answer instructions with a tuned checkpoint (KV cache, greedy or sampling)")
    gen.add_argument("checkpoint", help="checkpoint directory (or the run directory holding checkpoint/)")
    gen.add_argument("instruction", nargs="?", help="the instruction (or use --input-file)")
    gen.add_argument("--input", help="context for the instruction")
    gen.add_argument("--input-file", help="JSONL of {instruction, context}: answer them all")
    gen.add_argument("--output", help="JSONL for the answers of --input-file")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.7)
    gen.add_argument("--top-p", type=float, default=0.9)
    gen.add_argument("--sample-seed", type=int, help="seed for sampling")
    gen.add_argument("--no-progress", action="store_true")
    _add_settings(gen)
    gen.set_defaults(func=cmd_generate)

    ins = sub.add_parser("inspect", help="a checkpoint's settings, parameter counts and expert shares per task")
    ins.add_argument("checkpoint")
    ins.add_argument("--split", choices=["test", "train"], default="test")
    ins.add_argument("--no-progress", action="store_true")
    _add_settings(ins)
    ins.set_defaults(func=cmd_inspect)

    st = sub.add_parser("settings", help="every setting with its default, the demo's value and what it does")
    st.add_argument("--markdown", action="store_true", help="as docs/settings.md holds them")
    st.set_defaults(func=cmd_settings)

    ev = sub.add_parser("eval", help="test perplexity per task, the gate's expert shares, and ROUGE-L / exact match of greedy answers")
    ev.add_argument("checkpoint", help="checkpoint directory (or the run directory holding checkpoint/)")
    ev.add_argument("--out", help="where eval.json and gate_heatmap.png go (default: beside the checkpoint)")
    ev.add_argument("--no-progress", action="store_true")
    _add_settings(ev)
    ev.set_defaults(func=cmd_eval)

    ca = sub.add_parser("cache", help="what the machine's cache holds (bases, start states, activations); prune unused entries")
    ca.add_argument("action", nargs="?", choices=["list", "prune"], default="list")
    ca.add_argument("--unused-days", type=_non_negative, metavar="N",
                    help="prune: delete the entries no run has used for N days (fractions allowed)")
    ca.add_argument("--dry-run", action="store_true", help="prune: say what would go, delete nothing")
    ca.add_argument("--entries", action="store_true", help="list: every entry with its size and days since its last use")
    ca.add_argument("--config", metavar="FILE", help="TOML file with settings (model-cache-dir is the one read)")
    add_cli_flags(ca, ModelConfig, skip=[f.name for f in dataclasses.fields(ModelConfig) if f.name != "model_cache_dir"])
    ca.set_defaults(func=cmd_cache)
    return parser


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of days: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 days, got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    user_errors = _user_errors()
    try:
        return args.func(args)
    except user_errors as exc:
        report.console.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
