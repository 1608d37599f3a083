"""Reading records from files and datasets through a column mapping: JSONL/JSON/Parquet files or
folders, saved `datasets` folders, hub ids. Every unusable row is named by its location in one error."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from .records import DataError, Record

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
                if lineno == 1:  # a byte-order mark, as Windows editors and spreadsheet exports write one
                    line = line.removeprefix(codecs.BOM_UTF8)
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
            content = json.loads(path.read_bytes().decode("utf-8-sig"))  # a byte-order mark is allowed
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


def names_a_path(source: str | Path) -> bool:
    """Whether `source` is meant as a local file or folder (it exists, or cannot be a hub id), not a hub dataset."""
    name = str(source)
    return Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.endswith(DATA_SUFFIXES) or name.count("/") > 1


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
    if names_a_path(name):
        raise DataError(f"{name}: no such file or folder")
    try:
        import datasets

        found = datasets.load_dataset(name)
    except Exception as exc:  # offline, no such dataset, gated, ...
        raise DataError(f"{name} is not a local file or folder, and the hub dataset could not be loaded: {exc}") from None
    return _dataset_records(found, columns, name, tasks)
