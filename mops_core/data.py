"""Multi-task instruction data: records, even sampling, split, template, batches.

A record is (instruction, context, response, task). Any source reduces to it through a column
mapping: a JSONL/JSON/Parquet file or folder, a saved `datasets` folder, or a hub dataset; the
paper's Dolly 15k and Super-NaturalInstructions are presets (a local copy first, then the hub).
The rest of the pipeline does not care where the data came from. Tokenised examples keep the question
(template + instruction + context) and the response apart: labels cover response tokens only,
and the gate reads the question tokens only (NOTES.md: the gate sees what exists at inference).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .config import DataConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataError(ValueError):
    """The data is missing, malformed, or cannot satisfy the requested settings."""


@dataclass(frozen=True)
class Record:
    instruction: str
    context: str
    response: str
    task: str


@dataclass(frozen=True)
class Example:
    """One tokenised sample: question ids, then response ids (the only labelled tokens)."""

    input_ids: tuple[int, ...]
    question_len: int
    task_id: int

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.question_len


# ---------------------------------------------------------------------------- reading

MAX_LISTED_PROBLEMS = 20
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet")


@dataclass(frozen=True)
class Columns:
    """Which field of a row holds each part of a record ('' context: the data has none)."""

    instruction: str = "instruction"
    context: str = "context"
    response: str = "response"
    task: str = "task"

    @classmethod
    def of(cls, cfg: DataConfig) -> Columns:
        return cls(cfg.instruction_column, cfg.context_column, cfg.response_column, cfg.task_column)

    def by_setting(self) -> dict[str, str]:
        named = {"instruction-column": self.instruction, "context-column": self.context,
                 "response-column": self.response, "task-column": self.task}
        return {setting: column for setting, column in named.items() if column}

    def check_fields(self, fields: Iterable[str], source: object) -> None:
        """Refuse a mapping that names a field the data does not have, naming the setting."""
        fields = set(fields)
        for setting, column in self.by_setting().items():
            if column not in fields:
                shown = ", ".join(sorted(fields)[:12]) or "none"
                raise DataError(f"{setting} '{column}' is not a field of {source} (its fields: {shown})")

    def problem(self, row: dict) -> str | None:
        """Why a row cannot be a record, or None. Context may be null (no context); a task label may be a number."""
        missing = [c for c in self.by_setting().values() if c not in row]
        if missing:
            return f"missing field(s) {', '.join(missing)}"
        bad = [c for c in (self.instruction, self.response) if not isinstance(row[c], str)]
        bad += [self.context] if self.context and not isinstance(row[self.context], (str, type(None))) else []
        bad += [self.task] if isinstance(row[self.task], bool) or not isinstance(row[self.task], (str, int)) else []
        if bad:
            return f"field(s) {', '.join(f'{c} ({type(row[c]).__name__})' for c in bad)} must be strings"
        return None

    def record(self, row: dict) -> Record:
        context = (row[self.context] or "") if self.context else ""
        return Record(row[self.instruction].strip(), context.strip(), row[self.response].strip(), str(row[self.task]))


def _parse_line(line: bytes) -> tuple[dict | None, str | None]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte 0x{line[exc.start]:02x} at column {exc.start + 1})"
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}, column {exc.colno})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, None


def _raise_problems(source: object, problems: Sequence[str], what: str = "line") -> None:
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        tail = [f"... and {more} more bad {what}s"] if more else []
        raise DataError(f"{len(problems)} unreadable {what}(s) in {source}:\n" + "\n".join(listed + tail))


def _jsonl_rows(path: Path) -> tuple[list[tuple[int, str, dict]], list[tuple[int, str]]]:
    """((line, "FILE:LINE", row) for every object line, (line, problem) for every unusable one)."""
    rows, problems = [], []
    try:
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row, problem = _parse_line(line.rstrip(b"\r\n"))
                if problem:
                    problems.append((lineno, f"{path}:{lineno}: {problem}"))
                else:
                    rows.append((lineno, f"{path}:{lineno}", row))
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    return rows, problems


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict]:
    """The rows of a JSONL file, each an object with string `required` fields.

    Every unusable line is reported as `FILE:LINE: problem` (all of them, up to a limit), so that
    a file is fixed in one go; a file without a single row says so.
    """
    rows, problems = _jsonl_rows(path)
    for line, where, row in rows:
        missing = [k for k in required if k not in row]
        bad = [f"{k} ({type(row[k]).__name__})" for k in required if k in row and not isinstance(row[k], str)]
        if missing or bad:
            problem = f"missing field(s) {', '.join(missing)}" if missing else f"field(s) {', '.join(bad)} must be strings"
            problems.append((line, f"{where}: {problem}"))
    _raise_problems(path, [p for _, p in sorted(problems)])
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return [row for _, _, row in rows]


def _table_records(rows: Sequence[tuple[int, str, dict]], columns: Columns, source: object,
                   problems: Sequence[tuple[int, str]] = (), what: str = "line") -> list[Record]:
    """Records from located rows (position, location, row); every bad row named by its location, in one error."""
    if rows:
        columns.check_fields({k for _, _, row in rows for k in row}, source)
    found = list(problems)
    for position, where, row in rows:
        problem = columns.problem(row)
        if problem:
            found.append((position, f"{where}: {problem}"))
    _raise_problems(source, [p for _, p in sorted(found)], what)
    if not rows:
        raise DataError(f"{source}: no rows (it is empty or holds only blank lines)")
    return [columns.record(row) for _, _, row in rows]


def _file_records(path: Path, columns: Columns) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            content = json.loads(path.read_bytes())
        except json.JSONDecodeError:  # JSON Lines under a .json name, as `datasets` writes them
            suffix = ".jsonl"
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot be read ({exc})") from None
        else:
            if not isinstance(content, list):
                raise DataError(f"{path}: expected a JSON array of objects (or JSON Lines), got a {type(content).__name__}")
            bad = [(i, f"{path}: item {i}: expected a JSON object") for i, row in enumerate(content) if not isinstance(row, dict)]
            rows = [(i, f"{path}: item {i}", row) for i, row in enumerate(content) if isinstance(row, dict)]
            return _table_records(rows, columns, path, bad, what="item")
    if suffix in (".jsonl", ".ndjson"):
        rows, problems = _jsonl_rows(path)
        return _table_records(rows, columns, path, problems)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
        columns.check_fields(table.column_names, path)
        rows = [(i, f"{path}: row {i}", row) for i, row in enumerate(table.select(list(dict.fromkeys(columns.by_setting().values()))).to_pylist())]
        return _table_records(rows, columns, path, what="row")
    raise DataError(f"{path}: unknown format '{path.suffix}' (use {', '.join(DATA_SUFFIXES)}, or a saved `datasets` folder)")


def _dataset_records(found: Any, columns: Columns, source: str, tasks: Sequence[str] | None) -> list[Record]:
    """Records of a `datasets` Dataset or DatasetDict (every split, in name order), only `tasks` if given."""
    import datasets

    parts = [found[name] for name in sorted(found)] if isinstance(found, datasets.DatasetDict) else [found]
    table = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    columns.check_fields(table.column_names, source)
    if tasks:  # a hub dataset may hold thousands of tasks: keep the run's before converting rows
        wanted = set(tasks)
        table = table.filter(lambda t: str(t) in wanted, input_columns=columns.task)
    table = table.select_columns(list(dict.fromkeys(columns.by_setting().values())))
    rows = [(i, f"{source}: row {i}", row) for i, row in enumerate(table.to_list())]
    return _table_records(rows, columns, source, what="row")


def read_records(source: str | Path, columns: Columns, *, tasks: Sequence[str] | None = None) -> list[Record]:
    """Records from a .jsonl/.json/.parquet file, a folder of them, a saved `datasets` folder, or a hub id.

    `tasks` only lets a large `datasets` source drop other tasks early; the caller filters the rest.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return _file_records(path, columns)
    if path.is_dir():
        if any((path / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            import datasets

            return _dataset_records(datasets.load_from_disk(str(path)), columns, str(path), tasks)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path}: holds no {', '.join(DATA_SUFFIXES)} file and is not a saved `datasets` folder")
        return [record for file in files for record in _file_records(file, columns)]
    name = str(source)
    if name.startswith((".", "/", "~")) or name.endswith(DATA_SUFFIXES) or name.count("/") > 1:
        raise DataError(f"{name}: no such file or folder")
    try:
        import datasets

        found = datasets.load_dataset(name)
    except Exception as exc:  # offline, no such dataset, gated, ...
        raise DataError(f"{name} is not a local file or folder, and the hub dataset could not be loaded: {exc}") from None
    return _dataset_records(found, columns, name, tasks)


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
    for root in dict.fromkeys((Path(__file__).resolve().parent.parent, Path.cwd())):
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


# ---------------------------------------------------------------------------- sampling


def even_quotas(available: dict[str, int], total: int) -> dict[str, int]:
    """Split `total` as evenly as possible over tasks, capped by what each task has.

    Water-filling: a task with fewer rows than its share gives all it has, and the rest is
    shared again among the others. Remainders go to tasks in name order (deterministic).
    """
    quotas = {t: 0 for t in available}
    remaining = min(total, sum(available.values()))
    while remaining > 0:
        open_tasks = sorted(t for t in available if quotas[t] < available[t])
        share, extra = divmod(remaining, len(open_tasks))
        for i, task in enumerate(open_tasks):
            take = min(share + (1 if i < extra else 0), available[task] - quotas[task])
            quotas[task] += take
            remaining -= take
    return quotas


def sample_and_split(records: Sequence[Record], cfg: DataConfig) -> tuple[list[Record], list[Record]]:
    """Draw `samples` records evenly over tasks, then hold out `test_fraction` of each task."""
    by_task: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        by_task[record.task].append(record)
    quotas = even_quotas({t: len(rs) for t, rs in by_task.items()}, cfg.samples)
    if sum(quotas.values()) < cfg.samples:
        log.warning("asked for %d samples, the data holds %d", cfg.samples, sum(quotas.values()))
    rng = random.Random(cfg.data_seed)
    train: list[Record] = []
    test: list[Record] = []
    for task in sorted(by_task):
        pool = sorted(by_task[task], key=lambda r: (r.instruction, r.context, r.response))
        rng.shuffle(pool)
        chosen = pool[: quotas[task]]
        n_test = round(len(chosen) * cfg.test_fraction)
        if len(chosen) >= 2:
            n_test = min(max(n_test, 1), len(chosen) - 1)
        test += chosen[:n_test]
        train += chosen[n_test:]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def task_counts(records: Sequence[Record]) -> Counter:
    return Counter(r.task for r in records)


# ---------------------------------------------------------------------------- template

PLAIN_TEMPLATE = "### Instruction:\n{content}\n\n### Response:\n"
_CONTENT_MARK = "\x1fMOPS_CONTENT\x1f"


class Formatter:
    """Turns records into token ids with one template for every dataset and model.

    Models with a chat template get it (one user turn, then the assistant header); others a
    plain instruction template. The user turn is the instruction, then the context if any.
    Too-long samples keep as much response as the question leaves (at least half the budget)
    and lose the middle of the user content, which keeps both the instruction's start and the
    context's end (often the actual question).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, tasks: Sequence[str]):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.task_ids = {t: i for i, t in enumerate(tasks)}
        if tokenizer.chat_template:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": _CONTENT_MARK}], tokenize=False, add_generation_prompt=True
            )
        else:
            rendered = PLAIN_TEMPLATE.format(content=_CONTENT_MARK)
        prefix, suffix = rendered.split(_CONTENT_MARK)
        self.prefix_ids = self._ids(prefix)
        self.suffix_ids = self._ids(suffix)
        if tokenizer.eos_token_id is None:
            raise DataError("the tokenizer has no end-of-sequence token to end responses with")
        self.eos_id = tokenizer.eos_token_id
        if len(self.prefix_ids) + len(self.suffix_ids) + 8 > max_length:
            raise DataError(f"max-length {max_length} leaves no room beside the template's own tokens")

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text else []

    def _content_ids(self, instruction: str, context: str) -> list[int]:
        return self._ids(instruction + (f"\n\n{context}" if context else ""))

    def _question(self, content: list[int], budget: int) -> list[int]:
        room = budget - len(self.prefix_ids) - len(self.suffix_ids)
        if len(content) > room:
            head = room // 2
            content = content[:head] + content[len(content) - (room - head) :]
        return self.prefix_ids + content + self.suffix_ids

    def question_ids(self, instruction: str, context: str = "") -> list[int]:
        """The question alone, as the gate and generation see it."""
        return self._question(self._content_ids(instruction, context), self.max_length)

    def example(self, record: Record) -> Example:
        content = self._content_ids(record.instruction, record.context)
        response = self._ids(record.response) + [self.eos_id]
        question_len = len(self.prefix_ids) + len(content) + len(self.suffix_ids)
        if question_len + len(response) > self.max_length:
            keep = max(min(len(response), self.max_length // 2), self.max_length - question_len)
            response = response[:keep]
        question = self._question(content, self.max_length - len(response))
        return Example(tuple(question + response), len(question), self.task_ids.get(record.task, -1))

    def examples(self, records: Sequence[Record]) -> list[Example]:
        return [self.example(r) for r in records]


# ---------------------------------------------------------------------------- batches


def collate(examples: Sequence[Example], pad_id: int, *, with_response: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, question_mask, labels, task_ids.

    With `with_response=False` only the questions are kept (gate pretraining, generation).
    """
    seqs = [ex.input_ids if with_response else ex.input_ids[: ex.question_len] for ex in examples]
    width = max(len(s) for s in seqs)
    batch = len(seqs)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    question_mask = torch.zeros((batch, width), dtype=torch.bool)
    labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
    for i, (ex, seq) in enumerate(zip(examples, seqs)):
        n = len(seq)
        input_ids[i, :n] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, :n] = 1
        question_mask[i, : ex.question_len] = True
        if with_response:
            labels[i, ex.question_len : n] = input_ids[i, ex.question_len : n]
    task_ids = torch.tensor([ex.task_id for ex in examples], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "question_mask": question_mask,
        "labels": labels,
        "task_ids": task_ids,
    }


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a padding nor an end-of-sequence token")
    return pad


@dataclass
class PreparedData:
    """Everything a run needs from the data: tasks and tokenised train/test examples."""

    tasks: tuple[str, ...]
    train_records: list[Record]
    test_records: list[Record]
    train: list[Example]
    test: list[Example]


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, tasks: Sequence[str] | None = None) -> PreparedData:
    """Sample, split and tokenise the run's data; task ids follow `tasks` (default: `run_tasks`)."""
    records = load_records(cfg)
    train_records, test_records = sample_and_split(records, cfg)
    tasks = tuple(tasks) if tasks is not None else run_tasks(cfg)
    formatter = Formatter(tokenizer, cfg.max_length, tasks)
    return PreparedData(tasks, train_records, test_records, formatter.examples(train_records), formatter.examples(test_records))
