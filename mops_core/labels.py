"""Two conventions the model, the data, training and the result tables share (no torch: tables are
drawn without it).

- Expert i is task i's (the paper's one-to-one assignment): the gate's routing target.
- Label positions set to IGNORE_INDEX carry no loss: everything but the response tokens.
"""

from __future__ import annotations

from typing import TypeVar

IGNORE_INDEX = -100  # the label of a position the loss skips (PyTorch's cross-entropy default)

T = TypeVar("T")


def expert_targets(task_ids: T, experts: int) -> T:
    """The expert each task id routes to: task i -> expert i, wrapping if tasks outnumber experts.
    Takes a tensor of task ids or one id."""
    return task_ids % experts
