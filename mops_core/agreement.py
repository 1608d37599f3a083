"""How much the clients' updates of one round agree: the interference averaging suffers from.

FedAvg of prompts that clients pulled in different directions cancels: the average moves less than
any client did. Two numbers per round measure it, from each client's update (its returned tensor
minus the global one the round started from):

- `cosine`: the mean cosine similarity over pairs of clients (1: all pulled the same way, 0:
  unrelated directions, below 0: opposed).
- `norm_ratio`: the norm of the averaged update over the mean norm of the clients' updates (1 when
  they agree, towards 0 as they cancel), with the average's own weights (examples).

For FedPrompt an update is the whole prompt tensor. For MoPs each expert is measured on its own,
its pairs weighted by how much both clients used it (the product of their mean gate scores on it),
and its average weighted by examples x gate, as `expert-aggregation = "gate"` averages; the
experts' numbers are then pooled, each weighted by its use. MoPs removes interference if its
experts' updates agree more than FedPrompt's prompts do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _cosine(deltas: np.ndarray, pair_weight: np.ndarray) -> tuple[float, float]:
    """(weighted mean pairwise cosine, total pair weight) of deltas (C, n); pairs with a zero update left out."""
    norms = np.linalg.norm(deltas, axis=1)
    usable = norms > 0
    unit = np.where(usable[:, None], deltas / np.where(usable, norms, 1.0)[:, None], 0.0)
    upper = np.triu(np.ones_like(pair_weight, dtype=bool), k=1) & usable[:, None] & usable[None, :]
    weight = (pair_weight * upper).sum()
    if weight <= 0:
        return float("nan"), 0.0
    return float(((unit @ unit.T) * pair_weight * upper).sum() / weight), float(weight)


def _norm_ratio(deltas: np.ndarray, weights: np.ndarray) -> float:
    """||weighted mean of deltas (C, n)|| / weighted mean of their norms."""
    total = weights.sum()
    mean_norm = (weights * np.linalg.norm(deltas, axis=1)).sum() / total
    return float(np.linalg.norm((weights[:, None] * deltas).sum(0) / total) / mean_norm) if mean_norm > 0 else float("nan")


def update_agreement(deltas: Sequence[np.ndarray], examples: Sequence[float],
                     gate: np.ndarray | None = None) -> dict[str, float | None]:
    """`cosine` and `norm_ratio` of the clients' updates `deltas` (one array per client, all one shape),
    averaged with weights `examples`. With `gate` (clients x experts, each client's mean gate score per
    expert), axis 0 of every delta is the expert: each expert is measured alone, then pooled (see above).
    None where a number is undefined (fewer than two clients, no update at all)."""
    numbers = _agreement(deltas, examples, gate)
    return {k: (v if math.isfinite(v) else None) for k, v in numbers.items()}


def _agreement(deltas, examples, gate) -> dict[str, float]:
    stacked = np.stack([np.asarray(d, dtype=np.float64) for d in deltas])
    examples = np.asarray(examples, dtype=np.float64)
    if len(stacked) < 2:
        return {"cosine": float("nan"), "norm_ratio": float("nan")}
    if gate is None:
        cosine, _ = _cosine(stacked.reshape(len(stacked), -1), np.ones((len(stacked),) * 2))
        return {"cosine": cosine, "norm_ratio": _norm_ratio(stacked.reshape(len(stacked), -1), examples)}
    gate = np.asarray(gate, dtype=np.float64)
    if gate.shape != stacked.shape[:2]:
        raise ValueError(f"gate must be clients x experts {stacked.shape[:2]}, got {gate.shape}")
    cosines, pair_weights, ratios, usage = [], [], [], []
    for e in range(gate.shape[1]):
        per_expert = stacked[:, e].reshape(len(stacked), -1)
        cosine, weight = _cosine(per_expert, np.outer(gate[:, e], gate[:, e]))
        if weight > 0:
            cosines.append(cosine)
            pair_weights.append(weight)
        averaging = examples * gate[:, e]
        if averaging.sum() > 0:
            ratio = _norm_ratio(per_expert, averaging)
            if np.isfinite(ratio):
                ratios.append(ratio)
                usage.append(averaging.sum())
    return {
        "cosine": float(np.average(cosines, weights=pair_weights)) if cosines else float("nan"),
        "norm_ratio": float(np.average(ratios, weights=usage)) if ratios else float("nan"),
    }
