"""From records to model inputs: one template for every dataset and model, token ids, padded batches.
Labels cover response tokens only, and the gate reads the question tokens only (NOTES.md: the gate sees
what exists at inference)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from ..config import DataConfig
from ..labels import IGNORE_INDEX
from .records import DataError, Example, Record
from .sampling import sample_and_split
from .sources import load_records, run_tasks


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
