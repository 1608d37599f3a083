"""What the data is made of: a record (instruction, context, response, task) and its tokenised example."""

from __future__ import annotations

from dataclasses import dataclass


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
