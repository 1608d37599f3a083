"""MoPs against FedPrompt and the centralized baselines: the paper's tables and figures, one command.

    python -m simulation.benchmark --profile quick            # SmolLM2, Dolly, SparseGPT 75% and 2:4
    python -m simulation.benchmark --profile paper --model meta-llama/Llama-2-7b-hf --client-gpus 0.25
    python -m simulation.benchmark --profile quick --tables   # redraw tables and figures only

Every cell (one training run) writes its own folder under `<out>/cells/<id>/`; the id hashes
the cell's full settings, so a finished cell is never recomputed and a changed setting is a new
cell. Federated cells run the real Flower app on Ray (`flwr run`, through `simulation.launch`)
with `resume = true`: an interrupted cell continues from its last finished round. After each
cell, `results.json` (every setting, seed, step count, wall time and byte count), `results.csv`,
`tables.md` and the figures are rewritten from the records.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from client.replies import kept_round
from mops_core import atomic, centralized, checkpoint, peft_baselines
from mops_core.compression.pipeline import prepare_base
from mops_core.config import Settings
from mops_core.evaluate import gate_collapse
from mops_core.loading import base_fingerprint, machine
from mops_core.parsing import SettingsError
from mops_core.tracking import open_tracker

from . import tables
from .launch import PROJECT, cpus_arg, gpus_arg, launch
from .profiles import PEFT_METHODS, PROFILES, Cell, Profile, cells, same_settings

console = Console()
log = logging.getLogger(__name__)
CELL_FILE = "cell.json"  # written last, atomically: its presence means the cell is finished
REPLIES = "replies"  # a federated cell's clients' last replies (reply-cache-dir), what resuming mid-round reuses
COMMITS_FILE = "commits.json"  # the code each span of a federated cell's rounds ran, noted as each run of it starts


class CellFailed(RuntimeError):
    pass


# ---------------------------------------------------------------------- running one cell


def run_centralized(cell: Cell, folder: Path, *, progress: bool) -> dict:
    settings = Settings.from_flat(cell.settings)
    if cell.method in PEFT_METHODS:
        return peft_baselines.run(settings, cell.method, folder, progress=progress)
    return centralized.run(settings, folder, progress=progress)


def federated_runner(supernodes: int, client_cpus: int | None, client_gpus: float | None, flwr_home: Path | None = None):
    def run_federated(cell: Cell, folder: Path, *, progress: bool, until: int | None = None) -> dict:
        """The cell's run to its last round, or to round `until` (a stage: it resumes from there later,
        `num-server-rounds` being a setting a run may resume with, to the same numbers as a run straight through)."""
        rounds = until or cell.settings["num-server-rounds"]
        overrides = {k: v for k, v in cell.settings.items() if k not in ("out-dir", "resume", "reply-cache-dir")}
        # A cell stopped mid-round (a session's end) goes on from its last round without training again
        # the clients that had finished the next one: they kept their replies in the cell's folder.
        overrides.update({"out-dir": str(folder.resolve()), "resume": True, "reply-cache-dir": str((folder / REPLIES).resolve()),
                          "num-server-rounds": rounds})
        check_base(cell, folder)
        code = launch(overrides, supernodes=supernodes, client_cpus=client_cpus, client_gpus=client_gpus, flwr_home=flwr_home)
        path = folder / "results.json"
        if code != 0 or not path.exists():
            raise CellFailed(f"flwr run exited with code {code}")
        results = json.loads(path.read_text())
        finished = results["rounds"][-1]["round"] if results.get("rounds") else -1
        if finished != rounds:
            raise CellFailed(f"the run stopped after round {finished} of {rounds}")
        return results

    return run_federated


def check_base(cell: Cell, folder: Path) -> None:
    """A cell under way goes on only on the base its rounds tuned; said before Ray and the SuperLink start.

    Pruning gives other weights on another CPU kind, so a grid whose records travel between machines
    meets cells it cannot continue here: it goes on to its other cells, and this one waits for a
    machine with its base (or a cache that holds it)."""
    saved = checkpoint_config(folder)
    if not saved.get("base_fingerprint"):
        return
    here = base_fingerprint(prepare_base(Settings.from_flat(cell.settings), progress=False)[0])  # as runs load it
    if here != saved["base_fingerprint"]:
        raise CellFailed(
            f"its rounds 1-{saved.get('round')} tuned the base with fingerprint {saved['base_fingerprint']}, and its "
            f"settings prune to {here} here (pruning differs between CPU kinds and library versions): left for a machine "
            f"that gives its base, or the compression cache that holds it (`model-cache-dir`); delete {folder} to start "
            "it again here"
        )


# The project's code: what a commit of the project says about a cell's numbers.
CODE_PATHS = ("mops_core", "server", "client", "simulation", "pyproject.toml")


def source_commit(root: Path = PROJECT) -> str | None:
    """The project's commit as a cell starts, with `+changes` where its code differs from that commit;
    None outside a git checkout. A grid runs for hours, and its cells may span commits."""
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", *CODE_PATHS], capture_output=True).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if changed else "")


def read_commits(folder: Path) -> list[dict]:
    """The spans a federated cell's folder notes, `[{"from_round": 1, "commit": "1439aa3"}, ...]`; [] where
    none; ValueError where the file is damaged."""
    try:
        spans = json.loads((folder / COMMITS_FILE).read_text())
    except FileNotFoundError:
        return []
    if not isinstance(spans, list) or not all(isinstance(s, dict) and {"from_round", "commit"} <= s.keys() for s in spans):
        raise ValueError("not a list of {from_round, commit}")
    return spans


def note_commit(folder: Path, commit: str | None) -> list[dict]:
    """Note in a federated cell's folder the commit the run about to start goes on with, from the round
    after its checkpoint's: a cell runs for hours, is resumed in later sessions, after pulls, elsewhere,
    and its record (under way or finished) must name the code of every round. Returns the spans."""
    try:
        spans = read_commits(folder)
    except (OSError, ValueError) as exc:
        console.print(f"[yellow]{folder / COMMITS_FILE} unreadable ({exc}): the commits of the rounds before "
                      "this run are not recorded[/yellow]")
        spans = []
    first = rounds_done(folder) + 1
    spans = [s for s in spans if s["from_round"] < first]  # the rounds from `first` on are run again
    if not spans or spans[-1]["commit"] != commit:
        spans.append({"from_round": first, "commit": commit})
    atomic.write_json(folder / COMMITS_FILE, spans)
    return spans


def rounds_done(folder: Path) -> int:
    """The last round a federated cell's checkpoint holds, where a run of it resumes; 0 where none."""
    try:
        return int(json.loads((folder / "checkpoint" / checkpoint.CONFIG_FILE).read_text()).get("round", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return 0  # no checkpoint the run can resume from: it starts over


def commit_label(folder: Path) -> str | None:
    """The commit a federated cell's rounds ran, as its record names it; None where nothing was noted."""
    try:
        spans = read_commits(folder)
    except (OSError, ValueError):
        return None
    if len(spans) <= 1:
        return spans[0]["commit"] if spans else None
    return tables.spans_label(spans, lambda s: s["commit"] or "not recorded")


def record(cell: Cell, results: dict, folder: Path, wall_seconds: float, commit: str | None = None) -> dict:
    """One row of results.json: the cell, its settings, and the numbers the tables and figures use."""
    saved = checkpoint_config(folder)
    common = {
        "id": cell.id, "kind": cell.kind, "method": cell.method, "study": cell.study, "variants": list(cell.variants),
        "dataset": cell.dataset, "compression": cell.compression, "settings": cell.settings,
        "dir": str(folder), "wall_seconds": wall_seconds, "commit": commit,
        # inject-layer -1 is a share of the depth: the layer the run used is in its checkpoint.
        "inject_layer": int(saved["inject_layer"]) if "inject_layer" in saved else None,
        "base_fingerprint": results.get("base_fingerprint") or results.get("info", {}).get("base_fingerprint"),
        "machine": machine(Settings.from_flat(cell.settings).model),  # the runs of a grid are local to this process's machine
    }
    if cell.kind == "centralized":
        after, losses = results["after"], results["train"]["losses"]
        row = {
            "tasks": results["tasks"], "perplexity_start": results["before"]["perplexity"], "perplexity": after["perplexity"],
            "routing_accuracy_start": results["before"]["routing_accuracy"], "prompt_lr": results.get("prompt_lr"),
            "per_task": {t: s["perplexity"] for t, s in after["per_task"].items()}, "steps": results["train"]["steps"],
            "task_gate_entropy": {t: s.get("gate_entropy") for t, s in after["per_task"].items()},
            "task_routing": {t: s.get("routing_accuracy") for t, s in after["per_task"].items()},
            "trainable_parameters": results.get("trainable_parameters"), "bytes_communicated": 0,
            "gate_matrix": after["gate_matrix"], "gate_entropy": after["gate_entropy"], "routing_accuracy": after["routing_accuracy"],
            "curve": {"x": list(range(1, len(losses) + 1)), "y": losses, "label": "training loss (smoothed)"},
        }
    else:
        rounds = results["rounds"]
        last = rounds[-1]
        row = {
            "tasks": list(cell_tasks(results)), "perplexity_start": rounds[0]["perplexity"], "perplexity": last["perplexity"],
            "per_task": last.get("per_task"), "task_gate_entropy": last.get("task_gate_entropy"), "task_routing": last.get("task_routing"),
            "steps": sum(r.get("accepted", 0) for r in rounds) * cell.settings["local-steps"],  # client steps in all
            "trainable_parameters": results.get("info", {}).get("trainable_parameters"),
            "bytes_communicated": sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds),
            "gate_matrix": last.get("gate_matrix"), "gate_entropy": last.get("gate_entropy"),
            "routing_accuracy": last.get("routing_accuracy"),
            "rounds": [round_record(r) for r in rounds],
            "client_perplexity": (last.get("client_eval") or {}).get("perplexity"),
            # after each evaluating client adapted a copy on its own data (personalize-steps); None without
            "client_adapted_perplexity": ((last.get("client_eval") or {}).get("adapted") or {}).get("perplexity"),
            "agreement": mean_agreement(rounds),
            # A cell resumed on another machine: each machine from the round it took over.
            "machines": results.get("info", {}).get("machines"),
            "commit": commit_label(folder) or commit,  # each span's, for a cell resumed after a pull
            "curve": {"x": [r["round"] for r in rounds], "y": [r["perplexity"] for r in rounds], "label": "test perplexity"},
        }
    generation = results.get("generation") if cell.kind == "centralized" else results["rounds"][-1].get("generation")
    row.update(rouge_l=generation["rouge_l"] if generation else None, exact_match=generation["exact_match"] if generation else None,
               task_rouge_l={t: s["rouge_l"] for t, s in generation["per_task"].items()} if generation else None)
    return {**common, **row, **(gate_collapse(row["gate_matrix"]) or {})}


# What a cell's record keeps of each round of its results.json: enough to redraw its curves, per task
# and per client, anywhere (the gate matrix and the rest stay in the cell's folder).
ROUND_FIELDS = ("round", "perplexity", "per_task", "train_loss", "gate_entropy", "routing_accuracy", "task_routing",
                "task_entropy", "expert_share", "agreement", "seconds", "eval_seconds", "client_eval_seconds",
                "wall_seconds", "accepted", "sampled", "bytes_down", "bytes_up")


def round_record(row: dict) -> dict:
    client = row.get("client_eval") or {}
    adapted = client.get("adapted") or {}
    generation = row.get("generation")
    return {
        **{k: row.get(k) for k in ROUND_FIELDS},
        "client_perplexity": client.get("perplexity"),
        "client_spread": {k: client.get(k) for k in ("p10", "p50", "p90", "clients")} if client else None,
        "client_adapted": {k: adapted.get(k) for k in ("perplexity", "p10", "p50", "p90")} if adapted else None,
        "rouge_l": generation["rouge_l"] if generation else None,
        "exact_match": generation["exact_match"] if generation else None,
    }


def mean_agreement(rounds: Sequence[dict]) -> dict[str, float | None]:
    """The clients' update agreement (cosine, norm ratio) averaged over a run's training rounds."""
    out = {}
    for key in ("cosine", "norm_ratio"):
        values = [r["agreement"][key] for r in rounds if r.get("agreement") and r["agreement"].get(key) is not None]
        out[key] = sum(values) / len(values) if values else None
    return out


def checkpoint_config(folder: Path) -> dict:
    """What a prompt run's checkpoint says of itself; {} for PEFT baselines, which keep no MoPs checkpoint."""
    path = folder / "checkpoint"
    return checkpoint.read(path).config if path.is_dir() else {}


def cell_tasks(results: dict) -> list[str]:
    last = results["rounds"][-1]
    return list(results.get("info", {}).get("tasks") or last.get("per_task") or [])


# ---------------------------------------------------------------------- the grid


Runner = Callable[..., dict]


def finished_cells(out_dir: Path) -> list[dict]:
    """Every finished cell under `out_dir/cells/`, whatever its folder is called."""
    found = []
    for path in sorted((Path(out_dir) / "cells").glob(f"*/{CELL_FILE}")):
        try:
            saved = {**json.loads(path.read_text()), "dir": str(path.parent)}  # where it is now, if moved
        except (OSError, json.JSONDecodeError):
            continue  # a damaged marker: the cell runs again
        found.append(saved)
    return found


def finished_record(cell: Cell, finished: Sequence[dict]) -> dict | None:
    """The finished run of this cell: same kind, method and settings, matched on content, not on the
    folder name, so that a run moved or renamed still counts and a changed default never counts.
    """
    for saved in finished:
        if ran_as(saved, cell):
            return {**saved, "variants": list(cell.variants), "study": cell.study}  # the grid may give a run more names
    return None


def ran_as(saved: dict, cell: Cell) -> bool:
    """Whether a finished run is this cell: kind, method and settings."""
    return saved.get("kind") == cell.kind and saved.get("method") == cell.method and same_settings(
        saved.get("settings", {}), cell.settings, gated=cell.method == "mops"
    )


def time_on_disk(folder: Path) -> float:
    """What the rounds already in a started run's folder took (its clock stops while it lies stopped)."""
    try:
        rounds = json.loads((folder / "results.json").read_text())["rounds"]
        return float(rounds[-1].get("wall_seconds", 0.0)) if rounds else 0.0
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 0.0  # nothing started, or a record the runner will refuse or rewrite


def export_records(grid: Sequence[Cell], out_dir: Path, dest: Path) -> list[tuple[str, str]]:
    """Copy each cell's small record under `dest/cells/<id>/`, to commit beside the code.

    A finished cell leaves its `cell.json`; one under way, its checkpoint and `results.json`: what
    resuming it needs, on this machine or another (copied back under a benchmark's `cells/`).
    Returns (cell id, what was copied) for every cell that had something.
    """
    out_dir, dest = Path(out_dir), Path(dest)
    finished = finished_cells(out_dir)
    exported = []
    for cell in grid:
        done = finished_record(cell, finished)
        if done is not None:
            source = Path(done["dir"])
            target = dest / "cells" / source.name
            atomic.write_bytes(target / CELL_FILE, (source / CELL_FILE).read_bytes())
            shutil.rmtree(target / "checkpoint", ignore_errors=True)  # what resuming it needed is no longer needed
            for name in ("results.json", COMMITS_FILE):  # the finished record names the commits
                (target / name).unlink(missing_ok=True)
            shutil.rmtree(target / REPLIES, ignore_errors=True)
            exported.append((source.name, "finished"))
            continue
        source, target = out_dir / "cells" / cell.id, dest / "cells" / cell.id
        if not (source / "checkpoint" / checkpoint.CONFIG_FILE).exists() or not (source / "results.json").exists():
            continue  # not started, or no round saved yet: nothing to resume from
        # The checkpoint first: results.json may then be a round ahead of it, which resuming rewinds; never behind.
        saved = _copy_checkpoint(source / "checkpoint", target / "checkpoint")
        results = json.loads((source / "results.json").read_text())
        if (source / COMMITS_FILE).exists():
            atomic.write_bytes(target / COMMITS_FILE, (source / COMMITS_FILE).read_bytes())
            # The record itself names its code, beside the machines and dtype its run noted.
            results.setdefault("info", {})["commits"] = read_commits(source)
            saved["commits"] = results["info"]["commits"]
            atomic.write_json(target / "checkpoint" / checkpoint.CONFIG_FILE, saved)
        atomic.write_json(target / "results.json", results)
        # The clients' replies kept for the round under way: a session that resumes the cell elsewhere reuses them.
        shutil.rmtree(target / REPLIES, ignore_errors=True)
        for kept in sorted((source / REPLIES).glob("*.safetensors")):
            if kept_round(kept.name) == saved.get("round", 0) + 1:  # older rounds' replies are of no use again
                atomic.write_bytes(target / REPLIES / kept.name, kept.read_bytes())
        exported.append((cell.id, f"under way: checkpoint of round {saved.get('round', 0)}"))
    return exported


def _copy_checkpoint(source: Path, target: Path, tries: int = 5) -> dict:
    """A consistent copy of a checkpoint that a running cell may replace meanwhile (its config names the round);
    returns the config."""
    for _ in range(tries):
        config = (source / checkpoint.CONFIG_FILE).read_bytes()
        weights = (source / checkpoint.WEIGHTS_FILE).read_bytes()
        if (source / checkpoint.CONFIG_FILE).read_bytes() == config:
            with atomic.directory(target) as tmp:
                (tmp / checkpoint.CONFIG_FILE).write_bytes(config)
                (tmp / checkpoint.WEIGHTS_FILE).write_bytes(weights)
            return json.loads(config)
    raise OSError(f"{source} kept changing while it was copied; try again")


def stages(grid: Sequence[Cell], stage_rounds: int = 0) -> list[tuple[int, Cell, int | None]]:
    """(the cell's number in the grid, the cell, the round this run of it stops at, None = its last) in the
    order they run. With `stage_rounds`, the federated cells the tables pair (one dataset, base, seed and
    study) take turns: each to round `stage_rounds`, then each to twice that, and so on to their last."""
    if stage_rounds <= 0:
        return [(number, cell, None) for number, cell in enumerate(grid, 1)]
    groups: dict[tuple, list[tuple[int, Cell]]] = {}
    for number, cell in enumerate(grid, 1):
        paired = cell.kind == "federated"
        key = (cell.dataset, cell.compression, cell.settings["seed"], cell.study) if paired else ("alone", number)
        groups.setdefault(key, []).append((number, cell))
    plan = []
    for members in groups.values():
        ends = {cell.id: cell.settings["num-server-rounds"] if cell.kind == "federated" else 0 for _, cell in members}
        marks = {cell.id: {*range(stage_rounds, ends[cell.id], stage_rounds), ends[cell.id]} for _, cell in members}
        for mark in sorted(set().union(*marks.values())):
            plan += [(number, cell, None if mark == ends[cell.id] else mark) for number, cell in members if mark in marks[cell.id]]
    return plan


def run_grid(
    grid: Sequence[Cell],
    out_dir: Path,
    *,
    centralized_runner: Runner = run_centralized,
    federated_runner: Runner | None = None,
    progress: bool = True,
    meta: dict | None = None,
    stage_rounds: int = 0,
) -> tuple[list[dict], list[tuple[Cell, str]]]:
    """Run every unfinished cell (federated ones in stages of `stage_rounds`, see `stages`), rewriting the
    outputs after each run; returns (records, failures)."""
    out_dir = Path(out_dir)
    records: list[dict] = []
    failures: list[tuple[Cell, str]] = []
    started, imported = time.perf_counter(), source_commit()
    finished = finished_cells(out_dir)
    varying = sorted(k for k in (grid[0].settings if grid else {}) if len({json.dumps(c.settings.get(k)) for c in grid}) > 1
                     and k not in ("out-dir", "resume"))
    seen: set[str] = set()
    for number, cell, until in stages(grid, stage_rounds):
        folder = out_dir / "cells" / cell.id
        first_visit = cell.id not in seen
        seen.add(cell.id)
        if any(failed.id == cell.id for failed, _ in failures):
            continue  # its partner goes on alone
        done = finished_record(cell, finished)
        if done is not None:
            if first_visit:  # counted at once, so that the outputs written after each run hold it
                console.print(f"[dim]cell {number}/{len(grid)} {done['id']}: finished before, skipped[/dim]")
                records.append(done)
            continue
        if until is not None and rounds_done(folder) >= until:
            continue  # past this stage already
        named = ", ".join(v for v in cell.variants if v != "default")
        total = cell.settings.get("num-server-rounds")
        console.rule(
            f"cell {number}/{len(grid)}: {cell.kind} {cell.method}, {cell.dataset}, {cell.compression}, seed {cell.settings['seed']}"
            + (f" ({cell.study})" if cell.study != "main" else "") + (f" [{named}]" if named else "")
            + (f", to round {until} of {total}" if until is not None else "")
        )
        runner = centralized_runner if cell.kind == "centralized" else federated_runner
        # A centralized cell runs the code this process imported; a federated one, the tree as it starts.
        cell_started, commit = time.perf_counter(), imported if cell.kind == "centralized" else source_commit()
        try:
            if runner is None:
                raise CellFailed("no federated runner given")
            if cell.kind != "centralized":
                folder.mkdir(parents=True, exist_ok=True)
                note_commit(folder, commit)
            earlier = time_on_disk(folder)  # the rounds a stopped federated cell ran before
            results = runner(cell, folder, progress=progress, **({"until": until} if until is not None else {}))
        except (CellFailed, SettingsError, RuntimeError, ValueError, OSError) as exc:
            console.print(f"[red]cell {cell.id} failed: {exc}[/red]")
            failures.append((cell, str(exc)))
            continue
        if until is None:
            row = record(cell, results, folder, time.perf_counter() - cell_started + earlier, commit)
            atomic.write_json(folder / CELL_FILE, row)
            track_cell(cell, row, folder, varying)
            records.append(row)
        else:
            console.print(f"cell {cell.id} at round {until} of {total}: it goes on when its pair has come this far")
        write_outputs(records, out_dir, meta={**(meta or {}), "wall_seconds_this_run": time.perf_counter() - started},
                      under_way=under_way_records(grid, out_dir, records))
    return records, failures


def under_way_records(grid: Sequence[Cell], out_dir: Path, finished: Sequence[dict]) -> list[dict]:
    """A record of each federated cell started and not finished, from the rounds on disk: the round-by-round
    tables and figures show them (marked), so a grid of long cells shows its answer as it comes."""
    rows = []
    for cell in grid:
        folder = Path(out_dir) / "cells" / cell.id
        if cell.kind != "federated" or finished_record(cell, finished) is not None:
            continue
        try:
            results = json.loads((folder / "results.json").read_text())
            if len(results.get("rounds") or []) < 2:
                continue  # nothing trained yet
            row = record(cell, results, folder, time_on_disk(folder), commit_label(folder))
        except (OSError, ValueError, KeyError, TypeError, IndexError):
            continue  # a damaged or foreign results.json: the run itself will refuse or rewrite it
        spans = row.get("machines") or []
        if spans:  # where its rounds ran, not where the tables are drawn
            row["machine"] = {k: v for k, v in spans[-1].items() if k != "from_round"}
        rows.append({**row, "under_way": True})
    return rows


# A cell's numbers in TensorBoard's hparams table, one row per cell, beside its curves.
HPARAM_METRICS = ("perplexity_start", "perplexity", "client_perplexity", "rouge_l", "exact_match")


def track_cell(cell: Cell, row: dict, folder: Path, varying: Sequence[str]) -> None:
    """The finished cell as a row of TensorBoard's hparams view (its tracker's folder, where its curves are):
    its kind, method and the settings that vary over the grid, against its final numbers."""
    settings = Settings.from_flat(cell.settings)
    if settings.tracker.tracking != "tensorboard":
        return  # the table is TensorBoard's; a W&B run holds its settings in its config already
    tracker = open_tracker(settings.tracker, folder, name=cell.id, first_step=None)  # None: the curves stay
    try:
        tracker.hparams({"kind": cell.kind, "method": cell.method, **{k: cell.settings[k] for k in varying}},
                        {f"hparams/{k}": row.get(k) for k in HPARAM_METRICS} | {"hparams/hours": row["wall_seconds"] / 3600})
    finally:
        tracker.close()


def write_outputs(records: Sequence[dict], out_dir: Path, *, meta: dict | None = None, show: bool = False,
                  under_way: Sequence[dict] = ()) -> list[tables.ResultTable]:
    """results.json, results.csv, tables.md and the figures from the finished cells' records; the cells
    `under_way` join only the round-by-round table and figures (results.json lists them apart)."""
    grids = tables.all_tables(records, under_way)
    warnings = tables.grid_warnings(records)
    atomic.write_json(out_dir / "results.json", {**(meta or {}), "warnings": warnings, "cells": list(records),
                                                 "under_way": [{"id": r["id"], "seed": r["settings"]["seed"],
                                                                "round": r["rounds"][-1]["round"]} for r in under_way]})
    tables.write_csv(records, out_dir / "results.csv")
    every = [*records, *under_way]  # a grid with only cells under way still says where and at what they ran
    atomic.write_bytes(out_dir / "tables.md", "\n".join([*(f"**Warning:** {w}\n" for w in warnings), tables.machines_note(every) + "\n",
                                                        tables.commits_note(every) + "\n",
                                                        *(g.markdown() for g in grids)]).encode())
    tables.write_figures(records, out_dir / "figures", under_way)
    if show:
        for grid in grids:
            console.print(grid.rich())
    if show or warnings:
        show_warnings(warnings)
    return grids


def show_warnings(warnings: Sequence[str]) -> None:
    for warning in warnings:
        console.print(f"[red]warning:[/red] {warning}", soft_wrap=True)


# ---------------------------------------------------------------------- command line


def grid_summary(grid: Sequence[Cell]) -> str:
    """What the cells really run once --model, --set and --seeds have acted: a profile's prose cannot know."""
    def values(key: str) -> str:
        return ", ".join(dict.fromkeys(str(cell.settings[key]) for cell in grid))

    return f"model {values('model')}; data {values('dataset')}; compression {values('compression')}; seeds {values('seed')}"


def parse_sets(pairs: Sequence[str]) -> dict[str, Any]:
    """--set key=value (TOML values: 1e-3, true, "text"; bare words are strings)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"--set needs KEY=VALUE, got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = text
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mops-benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, help="results folder (default runs/benchmark-<profile>)")
    parser.add_argument("--model", help="base model (hub id, local dir, or 'smollm2'); default: the profile's")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a setting for every cell (repeatable)")
    parser.add_argument("--only", choices=("centralized", "federated"), help="run one kind of cell")
    parser.add_argument("--variants", help="comma-separated names of the profile's variants to run (default: all)")
    parser.add_argument("--datasets", help="comma-separated datasets of the main cells, e.g. dolly,sni (default: the profile's)")
    parser.add_argument("--compressions", help="comma-separated compressions of the main cells (default: the profile's)")
    parser.add_argument("--methods", help="comma-separated methods to run: prompt, mops, lora, ia3, fedprompt (default: all)")
    parser.add_argument("--no-sweeps", action="store_true", help="only the cells of the main tables: no L_int or prompt-count sweep")
    parser.add_argument("--seeds", help="comma-separated seeds of every main cell, e.g. 0,1,2,3 (default: the profile's)")
    parser.add_argument("--supernodes", type=int, help="simulated clients of federated cells (default: the profile's)")
    parser.add_argument("--client-cpus", type=cpus_arg, help="CPUs per ClientApp actor (default: as simulation.launch chooses)")
    parser.add_argument("--client-gpus", type=gpus_arg, help="GPUs per ClientApp actor, e.g. 0.25 (default: this "
                        "machine's GPUs shared among a round's clients, as `simulation.launch`)")
    parser.add_argument("--stage-rounds", type=int, metavar="N", help="federated cells the tables pair advance N rounds at a "
                        "time, taking turns, so paired numbers come at round N, 2N, ... before any cell ends (0 = each cell to "
                        "its end; default: the profile's)")
    parser.add_argument("--dry-run", action="store_true", help="list the cells and what is finished, run nothing")
    parser.add_argument("--tables", action="store_true", help="redraw tables and figures from the cells on disk (cells under "
                        "way only in the round-by-round ones)")
    parser.add_argument("--export", type=Path, metavar="DIR", help="copy every cell's small record to DIR/cells/ (cell.json; "
                        "for a cell under way its checkpoint and results.json, to resume it elsewhere), run nothing")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    profile: Profile = PROFILES[args.profile]
    if args.model:
        profile = replace(profile, model=args.model)
    if args.supernodes:
        profile = replace(profile, supernodes=args.supernodes, federated={**profile.federated, "min-available-nodes": args.supernodes})
    if args.seeds:
        try:
            seeds = tuple(dict.fromkeys(int(seed) for seed in args.seeds.split(",")))
        except ValueError:
            console.print(f"[red]error:[/red] --seeds: expected comma-separated integers, got {args.seeds!r}", soft_wrap=True)
            return 2
        profile = replace(profile, seeds=seeds, dataset_seeds={})  # every dataset: these
    if args.variants:
        names = [name.strip() for name in args.variants.split(",") if name.strip()]
        unknown = [name for name in names if name not in profile.variants]
        if unknown or not names:
            console.print(f"[red]error:[/red] --variants: {unknown or names} not among profile '{profile.name}''s variants: "
                          f"{', '.join(profile.variants)}", soft_wrap=True)
            return 2
        profile = replace(profile, variants={name: profile.variants[name] for name in names})
    chosen = {name: tuple(dict.fromkeys(v.strip() for v in value.split(",") if v.strip()))
              for name, value in (("datasets", args.datasets), ("compressions", args.compressions), ("methods", args.methods)) if value}
    if any(not values for values in chosen.values()):
        console.print(f"[red]error:[/red] --{next(n for n, v in chosen.items() if not v)}: names nothing", soft_wrap=True)
        return 2
    unknown = set(chosen.get("methods", ())) - {"prompt", "mops", *PEFT_METHODS, "fedprompt"}
    if unknown:
        console.print(f"[red]error:[/red] --methods: {', '.join(sorted(unknown))} is not one of prompt, mops, "
                      f"{', '.join(PEFT_METHODS)}, fedprompt", soft_wrap=True)
        return 2
    if "methods" in chosen:
        keep = chosen.pop("methods")
        profile = replace(profile, centralized_methods=tuple(m for m in profile.centralized_methods if m in keep),
                          federated_methods=tuple(m for m in profile.federated_methods if m in keep))
        if "mops" not in keep:
            profile = replace(profile, inject_layers=(), prompts_per_expert=())
    profile = replace(profile, **chosen)
    if "compressions" in chosen:
        profile = replace(profile, dataset_compressions={})  # every dataset: these
    if args.no_sweeps:
        profile = replace(profile, inject_layers=(), prompts_per_expert=())
    out = args.out or PROJECT / "runs" / f"benchmark-{profile.name}"
    kinds = (args.only,) if args.only else ("centralized", "federated")
    try:
        sets = parse_sets(args.set)
        grid = cells(profile, sets, kinds=kinds)
    except SettingsError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    if args.export:
        exported = export_records(grid, out, args.export)
        for name, what in exported:
            console.print(f"{name:48s} {what}", soft_wrap=True)
        console.print(f"{len(exported)} of {len(grid)} cells copied to {args.export / 'cells'}")
        return 0
    stage_rounds = profile.stage_rounds if args.stage_rounds is None else args.stage_rounds
    if stage_rounds < 0:
        console.print(f"[red]error:[/red] --stage-rounds: must be 0 or more, got {stage_rounds}", soft_wrap=True)
        return 2
    if args.dry_run or args.tables:
        saved = finished_cells(out)
        matches = {cell.id: finished_record(cell, saved) for cell in grid}
        finished = [r for r in matches.values() if r is not None]
        under_way = under_way_records(grid, out, finished)
        if args.dry_run:
            console.print(grid_summary(grid) + (f"; federated cells in stages of {stage_rounds} rounds" if stage_rounds else ""),
                          soft_wrap=True)
            for cell in grid:
                folder = out / "cells" / cell.id
                state = ("finished" if matches[cell.id] is not None
                         else f"to resume (round {rounds_done(folder)} of {cell.settings['num-server-rounds']})" if time_on_disk(folder) > 0
                         else "to run")
                console.print(f"{cell.id:48s} {cell.study:18s} {state:26s} seed {cell.settings['seed']:<3} {', '.join(cell.variants)}",
                              soft_wrap=True)
            show_warnings(tables.grid_warnings(finished))
        if args.tables and not finished and not under_way:
            console.print(f"no finished or started cell of this grid in {out}; nothing written")
        elif args.tables:
            write_outputs(finished, out, meta={"profile": profile.name}, show=True, under_way=under_way)
        return 0
    overrides = " ".join(f"{key}={value}" for key, value in sets.items())
    console.print(f"benchmark '{profile.name}': {profile.description}" + (f"; with {overrides}" if overrides else "")
                  + f"; {len(grid)} cells -> {out}\n{grid_summary(grid)}", soft_wrap=True)
    started = time.perf_counter()
    records, failures = run_grid(
        grid, out,
        # A Flower home of the grid's own: a demo or another grid started meanwhile keeps its SuperLink and state apart.
        federated_runner=federated_runner(profile.supernodes, args.client_cpus, args.client_gpus, flwr_home=out / "flwr-home"),
        progress=not args.no_progress,
        meta={"profile": profile.name, "overrides": sets},
        stage_rounds=stage_rounds,
    )
    wall = time.perf_counter() - started
    write_outputs(records, out, meta={"profile": profile.name, "overrides": sets, "wall_seconds_this_run": wall}, show=True,
                  under_way=under_way_records(grid, out, records))
    console.print(f"{len(records)} of {len(grid)} cells finished in {wall / 60:.1f} min; results in {out}")
    for cell, problem in failures:
        console.print(f"[red]failed: {cell.id}: {problem}[/red] (rerun the same command to retry it)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
