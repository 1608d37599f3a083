"""Dolly 15k and Super-NaturalInstructions: records, even sampling, split, template, batches.

A record is (instruction, context, response, task). Both datasets reduce to it, so the rest
of the pipeline does not care where the data came from. Tokenised examples keep the question
(template + instruction + context) and the response apart: labels cover response tokens only,
and the gate reads the question tokens only (NOTES.md: the gate sees what exists at inference).
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .config import DataConfig

log = logging.getLogger(__name__)

TASKS: dict[str, tuple[str, ...]] = {
    # Table 1 of the paper, in its order: expert i is pretrained on task i.
    "dolly": (
        "creative_writing",
        "closed_qa",
        "open_qa",
        "summarization",
        "information_extraction",
        "classification",
        "brainstorming",
    ),
    "sni": (
        "task001_quoref_question_generation",
        "task026_drop_question_generation",
        "task044_essential_terms_identifying_essential_words",
        "task1190_add_integer_to_list",
        "task1429_evalution_semantic_relation_classification",
        "task1703_ljspeech_textmodification",
        "task698_mmmlu_answer_generation_global_facts",
    ),
}
DOLLY_FILE = "dolly/databricks-dolly-15k.jsonl"
DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
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


def _row_problem(line: bytes, required: Sequence[str]) -> tuple[dict | None, str | None]:
    """(row, None) for a usable line, (None, problem) for one that is not."""
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
    missing = [k for k in required if k not in row]
    if missing:
        return None, f"missing field(s) {', '.join(missing)}"
    bad = [f"{k} ({type(row[k]).__name__})" for k in required if not isinstance(row[k], str)]
    if bad:
        return None, f"field(s) {', '.join(bad)} must be strings"
    return row, None


def read_jsonl(path: Path, required: Sequence[str]) -> list[dict]:
    """The rows of a JSONL file, each an object with string `required` fields.

    Every unusable line is reported as `FILE:LINE: problem` (all of them, up to a limit), so that
    a file is fixed in one go; a file without a single row says so.
    """
    rows, problems = [], []
    try:
        with path.open("rb") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                row, problem = _row_problem(line.rstrip(b"\r\n"), required)
                if problem:
                    problems.append(f"{path}:{lineno}: {problem}")
                else:
                    rows.append(row)
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        tail = [f"... and {more} more bad lines"] if more else []
        raise DataError(f"{len(problems)} unreadable line(s) in {path}:\n" + "\n".join(listed + tail))
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty or holds only blank lines)")
    return rows


def default_data_dirs() -> list[Path]:
    """Where data is looked for when `data_dir` is not set: `$MOPS_DATA_DIR`, then `data/` and
    `../shared/data` beside the project and beside the working directory. `flwr run .` runs the
    apps from a copy under `$FLWR_HOME/apps/`, but in the working directory it was started from."""
    candidates = [Path(os.environ["MOPS_DATA_DIR"])] if os.environ.get("MOPS_DATA_DIR") else []
    for root in dict.fromkeys((Path(__file__).resolve().parent.parent, Path.cwd())):
        candidates += [root / "data", root.parent / "shared" / "data"]
    return candidates


def resolve_data_dir(cfg: DataConfig) -> Path | None:
    """The local data folder to read, or None to fall back to the hub."""
    if cfg.data_dir:
        path = Path(cfg.data_dir).expanduser()
        if not path.is_dir():
            raise DataError(f"data-dir {path} does not exist")
        return path
    marker = DOLLY_FILE if cfg.dataset == "dolly" else "sni"
    for path in default_data_dirs():
        if (path / marker).exists():
            return path
    return None


def load_records(cfg: DataConfig) -> list[Record]:
    folder = resolve_data_dir(cfg)
    if folder is None:
        return _load_from_hub(cfg.dataset)
    return _load_dolly(folder) if cfg.dataset == "dolly" else _load_sni(folder)


def _load_dolly(folder: Path) -> list[Record]:
    path = folder / DOLLY_FILE
    if not path.exists():
        raise DataError(f"Dolly file not found: {path}")
    rows = read_jsonl(path, ("instruction", "context", "response", "category"))
    return _dolly_records(rows, path)


def _dolly_records(rows: Sequence[dict], source: object = "the Dolly data") -> list[Record]:
    tasks = set(TASKS["dolly"])  # general_qa is not one of the paper's seven
    records = [
        Record(r["instruction"].strip(), r["context"].strip(), r["response"].strip(), r["category"])
        for r in rows
        if r["category"] in tasks
    ]
    if not records:
        found = ", ".join(sorted({r["category"] for r in rows})[:10])
        raise DataError(f"{source}: no row of the paper's seven Dolly categories ({', '.join(TASKS['dolly'])}); found {found}")
    return records


def _load_sni(folder: Path) -> list[Record]:
    records: list[Record] = []
    missing = []
    for task in TASKS["sni"]:
        path = folder / "sni" / f"{task}.jsonl"
        if not path.exists():
            missing.append(task)
            continue
        rows = read_jsonl(path, ("definition", "input", "output"))
        records += [Record(r["definition"].strip(), r["input"].strip(), r["output"].strip(), task) for r in rows]
    if missing:
        log.warning("SNI tasks missing under %s/sni (their experts get no data): %s", folder, ", ".join(missing))
    if not records:
        raise DataError(f"no SNI task files found under {folder / 'sni'}")
    return records


def _load_from_hub(dataset: str) -> list[Record]:
    if dataset != "dolly":
        raise DataError(
            f"no local SNI files found (looked in {', '.join(map(str, default_data_dirs()))}); "
            "set data-dir to a folder with sni/<task>.jsonl files"
        )
    try:
        import datasets

        rows = datasets.load_dataset(DOLLY_HUB_ID, split="train")
    except Exception as exc:  # offline, no such dataset, ...
        raise DataError(
            f"no local Dolly file found (looked in {', '.join(map(str, default_data_dirs()))}) and the hub "
            f"dataset {DOLLY_HUB_ID} could not be loaded: {exc}"
        ) from exc
    return _dolly_records(list(rows), DOLLY_HUB_ID)


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


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> PreparedData:
    records = load_records(cfg)
    train_records, test_records = sample_and_split(records, cfg)
    tasks = TASKS[cfg.dataset]
    formatter = Formatter(tokenizer, cfg.max_length, tasks)
    return PreparedData(tasks, train_records, test_records, formatter.examples(train_records), formatter.examples(test_records))
