"""Perplexity on response tokens, overall and per task, and what the gate does per task.

Perplexity = exp(token-weighted mean NLL over response tokens), the paper's metric. The gate
matrix holds the mean expert scores of each task's test samples (the paper's Fig. 4);
routing accuracy is how often the top expert is the one pretrained for the sample's task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from .activations import ActivationCache, entering
from .data import Example, collate
from .model import MoPsModel
from .labels import expert_targets
from .train import gate_features


@dataclass
class TaskScore:
    perplexity: float
    tokens: int
    samples: int
    gate_entropy: float | None = None  # mean per-sample entropy of g over this task's samples (nats)
    routing_accuracy: float | None = None  # share of this task's samples whose top expert is the task's own
    nll: float = 0.0  # summed over the task's tokens: what a federated client reports, to be weighed by tokens


@dataclass
class EvalResult:
    perplexity: float
    loss: float  # token-weighted mean NLL
    tokens: int
    samples: int
    tasks: list[str]
    per_task: dict[str, TaskScore]
    gate_matrix: list[list[float]] | None  # tasks x experts, mean score
    gate_entropy: float | None  # mean per-sample entropy of g (nats)
    routing_accuracy: float | None  # top expert == expert of the sample's task

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GateShares:
    tasks: list[str]
    matrix: list[list[float]]  # tasks x experts, mean score over each task's questions
    entropy: float  # mean per-question entropy (nats)
    routing_accuracy: float  # top expert == the expert pretrained for the question's task
    samples: list[int]


@torch.no_grad()
def gate_shares(model: MoPsModel, examples: Sequence[Example], tasks: Sequence[str], *, pad_id: int, batch_size: int = 8) -> GateShares:
    """What the gate does with questions alone (no responses, no upper layers: quick)."""
    labelled = [ex for ex in examples if ex.task_id >= 0]
    scores = model.gate(gate_features(model, labelled, pad_id=pad_id, batch_size=batch_size).to(model.device)).exp().cpu()
    task_ids = torch.tensor([ex.task_id for ex in labelled])
    counts = torch.bincount(task_ids, minlength=len(tasks))
    sums = torch.zeros(len(tasks), model.experts).index_add_(0, task_ids, scores)
    entropy = -(scores * scores.clamp_min(1e-12).log()).sum(-1).mean().item()
    accuracy = (scores.argmax(-1) == expert_targets(task_ids, model.experts)).float().mean().item()
    matrix = (sums / counts.clamp_min(1).unsqueeze(1)).tolist()
    return GateShares(list(tasks), matrix, entropy, accuracy, counts.tolist())


def gate_collapse(matrix: Sequence[Sequence[float]] | None) -> dict[str, list[float]] | None:
    """Two signs of a collapsing gate, from the tasks x experts matrix of mean scores.

    `task_entropy`: the entropy (nats) of each task's *mean* gate: near 0 when a whole task goes
    to one expert. `expert_share`: each expert's mean score over tasks: an expert near 0 is
    never used by anyone. Tasks without test samples (all-zero rows) get None and no vote.
    """
    if not matrix:
        return None
    rows = torch.tensor(matrix, dtype=torch.float64)
    present = rows.sum(-1) > 0
    entropy = -(rows * rows.clamp_min(1e-12).log()).sum(-1)
    return {
        "task_entropy": [e if p else None for e, p in zip(entropy.tolist(), present.tolist())],
        "expert_share": rows[present].mean(0).tolist() if present.any() else [0.0] * rows.shape[1],
    }


def _perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens) if tokens else math.nan


@torch.no_grad()
def evaluate(
    model: MoPsModel,
    examples: Sequence[Example],
    tasks: Sequence[str],
    *,
    pad_id: int,
    batch_size: int = 8,
    max_samples: int = 0,
    inject: bool = True,
    cache: ActivationCache | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> EvalResult:
    examples = list(examples[:max_samples] if max_samples else examples)
    # One bucket per task, and one more for tasks the run does not know (a node's own data may hold
    # some): they count in the totals, not per task nor in routing.
    n_tasks = len(tasks)
    nll = torch.zeros(n_tasks + 1, dtype=torch.float64)
    tokens = torch.zeros(n_tasks + 1, dtype=torch.long)
    samples = torch.zeros(n_tasks + 1, dtype=torch.long)
    gate_sum = torch.zeros(n_tasks + 1, model.experts, dtype=torch.float64)
    entropy_sum = torch.zeros(n_tasks + 1, dtype=torch.float64)
    routed_right = torch.zeros(n_tasks + 1, dtype=torch.float64)
    gated = 0

    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
    chunks = range(0, len(order), batch_size)
    for start in tqdm(chunks, desc=desc, disable=not progress, leave=False, dynamic_ncols=True):
        chunk = [examples[i] for i in order[start : start + batch_size]]
        batch = {k: v.to(model.device) for k, v in collate(chunk, pad_id).items()}
        states = entering(model, batch, cache) if inject and cache is not None else None
        out = model(**batch, entering=states, inject=inject)
        task_ids = batch["task_ids"].cpu()
        bucket = torch.where(task_ids < 0, n_tasks, task_ids)
        nll.index_add_(0, bucket, out.nll.double().cpu())
        tokens.index_add_(0, bucket, out.tokens.cpu())
        samples.index_add_(0, bucket, torch.ones_like(bucket))
        if out.gate is not None:
            gate = out.gate.double().cpu()
            gate_sum.index_add_(0, bucket, gate)
            entropy_sum.index_add_(0, bucket, -(gate * gate.clamp_min(1e-12).log()).sum(-1))
            routed_right.index_add_(0, bucket, (gate.argmax(-1) == expert_targets(task_ids, model.experts)).double())
            gated += len(chunk)

    total_tokens = int(tokens.sum())
    per_task = {
        task: TaskScore(
            _perplexity(nll[i].item(), int(tokens[i])), int(tokens[i]), int(samples[i]),
            gate_entropy=entropy_sum[i].item() / int(samples[i]) if gated else None,
            routing_accuracy=routed_right[i].item() / int(samples[i]) if gated else None,
            nll=nll[i].item(),
        )
        for i, task in enumerate(tasks)
        if samples[i] > 0
    }
    known = int(samples[:n_tasks].sum())
    matrix = None
    if gated:
        matrix = (gate_sum[:n_tasks] / samples[:n_tasks].clamp_min(1).unsqueeze(1).double()).tolist()
    return EvalResult(
        perplexity=_perplexity(nll.sum().item(), total_tokens),
        loss=nll.sum().item() / total_tokens if total_tokens else math.nan,
        tokens=total_tokens,
        samples=len(examples),
        tasks=list(tasks),
        per_task=per_task,
        gate_matrix=matrix,
        gate_entropy=entropy_sum.sum().item() / gated if gated else None,
        routing_accuracy=routed_right[:n_tasks].sum().item() / known if gated and known else None,
    )
