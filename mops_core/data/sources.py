"""Where a run's records come from: the paper's presets (Dolly 15k, Super-NaturalInstructions; a local
copy first, then the hub) or the user's own data, and the run's task list (expert order)."""

from __future__ import annotations

import functools
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig
from .readers import Columns, _file_records, read_records
from .records import DataError, Record

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A dataset the paper uses: its tasks (Table 1's order: expert i is pretrained on task i), where
    a local copy lies under a data folder, and where it comes from on the hub."""

    tasks: tuple[str, ...]
    local: str  # a file under the data folder, '{task}' for one file per task
    local_columns: Columns
    hub_id: str
    hub_columns: Columns

    @property
    def marker(self) -> str:
        """What a data folder holds when it has a local copy."""
        return self.local.split("{", 1)[0].rstrip("/") or self.local


PRESETS: dict[str, Preset] = {
    "dolly": Preset(
        tasks=("creative_writing", "closed_qa", "open_qa", "summarization", "information_extraction",
               "classification", "brainstorming"),  # not general_qa, as in the paper
        local="dolly/databricks-dolly-15k.jsonl", local_columns=Columns(task="category"),
        hub_id="databricks/databricks-dolly-15k", hub_columns=Columns(task="category"),
    ),
    "sni": Preset(
        tasks=(
            "task001_quoref_question_generation",
            "task026_drop_question_generation",
            "task044_essential_terms_identifying_essential_words",
            "task1190_add_integer_to_list",
            "task1429_evalution_semantic_relation_classification",
            "task1703_ljspeech_textmodification",
            "task698_mmmlu_answer_generation_global_facts",
        ),
        local="sni/{task}.jsonl", local_columns=Columns("definition", "input", "output", "task"),
        # Super-NaturalInstructions on the hub, every task in one table (train and test splits).
        hub_id="Muennighoff/natural-instructions", hub_columns=Columns("definition", "inputs", "targets", "task_name"),
    ),
}
TASKS: dict[str, tuple[str, ...]] = {name: preset.tasks for name, preset in PRESETS.items()}


def default_data_dirs() -> list[Path]:
    """Where data is looked for when `data_dir` is not set: `$MOPS_DATA_DIR`, then `data/` and
    `../shared/data` beside the project and beside the working directory. `flwr run .` runs the
    apps from a copy under `$FLWR_HOME/apps/`, but in the working directory it was started from."""
    candidates = [Path(os.environ["MOPS_DATA_DIR"])] if os.environ.get("MOPS_DATA_DIR") else []
    for root in dict.fromkeys((Path(__file__).resolve().parents[2], Path.cwd())):
        candidates += [root / "data", root.parent / "shared" / "data"]
    return candidates


def resolve_data_dir(cfg: DataConfig) -> Path | None:
    """The local folder holding the preset's copy, or None to fall back to the hub."""
    if cfg.data_dir:
        path = Path(cfg.data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data-dir {path} does not exist")
        return path
    marker = PRESETS[cfg.dataset].marker
    for path in default_data_dirs():
        if (path / marker).exists():
            return path
    return None


def missing_local_copy(cfg: DataConfig) -> str | None:
    """What to tell a user whose preset has no local copy (every process will ask the hub for it); None when it has one."""
    if cfg.dataset not in PRESETS or cfg.data_dir or resolve_data_dir(cfg) is not None:
        return None
    preset = PRESETS[cfg.dataset]
    looked = ", ".join(map(str, default_data_dirs()))
    return (f"no local copy of {cfg.dataset} ({preset.marker} in {looked}), so it comes from the hub ({preset.hub_id}); "
            "set data-dir or $MOPS_DATA_DIR to the folder that holds it")


def _preset_records(name: str, cfg: DataConfig, tasks: Sequence[str]) -> list[Record]:
    preset = PRESETS[name]
    folder = resolve_data_dir(cfg)
    if folder is None:
        try:
            return read_records(preset.hub_id, preset.hub_columns, tasks=tasks)
        except DataError as exc:
            looked = ", ".join(map(str, default_data_dirs()))
            raise DataError(f"no local copy of {name} (looked for {preset.marker} in {looked}; set data-dir or $MOPS_DATA_DIR) and {exc}") from None
    paths = {task: folder / preset.local.format(task=task) for task in tasks}
    missing = [task for task, path in paths.items() if not path.exists()]
    if len(missing) == len(paths):
        raise DataError(f"no {name} data under {folder}: {', '.join(sorted(set(map(str, paths.values())))[:3])} not found")
    if missing:
        log.warning("%s tasks missing under %s (their experts get no data): %s", name, folder, ", ".join(missing))
    files = dict.fromkeys(path for path in paths.values() if path.exists())
    return [record for path in files for record in _file_records(path, preset.local_columns)]


def _stamp(cfg: DataConfig) -> tuple:
    """What says a local dataset changed: size and time of every file it is read from (hub ids: none)."""
    if cfg.dataset in PRESETS:
        folder = resolve_data_dir(cfg)
        root = folder / PRESETS[cfg.dataset].marker if folder is not None else None
    else:
        root = Path(cfg.dataset).expanduser()
    if root is None or not root.exists():
        return ()
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    stats = [(f, f.stat()) for f in files]
    return tuple((str(f), st.st_mtime_ns, st.st_size) for f, st in stats)


def load_records(cfg: DataConfig) -> list[Record]:
    """The run's records: those of its tasks (every task of the data when it names none).

    Read once per process while the files stay the same: the run's task list, its split and the
    compression's calibration text all start from them."""
    return list(_load_records(cfg, _stamp(cfg)))


@functools.lru_cache(maxsize=4)
def _load_records(cfg: DataConfig, stamp: tuple) -> tuple[Record, ...]:
    preset = cfg.dataset if cfg.dataset in PRESETS else None
    wanted = cfg.task_list or (PRESETS[preset].tasks if preset else ())
    if preset:
        records = _preset_records(preset, cfg, wanted)
    else:
        records = read_records(cfg.dataset, Columns.of(cfg), tasks=wanted or None)
    if not wanted:
        return tuple(records)
    found = Counter(r.task for r in records)
    held = ", ".join(sorted(found)[:12])
    absent = [t for t in cfg.task_list if not found[t]]
    if absent:
        raise DataError(f"tasks: {', '.join(absent)} not in {cfg.dataset} (it holds: {held})")
    keep = set(wanted)
    chosen = [r for r in records if r.task in keep]
    if not chosen:
        raise DataError(f"{cfg.dataset}: no record of its tasks ({', '.join(wanted)}); it holds: {held}")
    if len(chosen) < len(records):
        log.info("%s: left out %d records of tasks the run does not train", cfg.dataset, len(records) - len(chosen))
    return tuple(chosen)


def run_tasks(cfg: DataConfig) -> tuple[str, ...]:
    """The run's tasks in expert order: `tasks`, the preset's (Table 1's order), or the data's, sorted."""
    if cfg.task_list:
        return cfg.task_list
    if cfg.dataset in PRESETS:
        return PRESETS[cfg.dataset].tasks
    return tuple(sorted({r.task for r in load_records(cfg)}))
