"""Pruning one weight matrix: magnitude, Wanda and SparseGPT, unstructured or N:M.

All three take W (out x in) and return a pruned copy. "N:M" follows the paper: N of every M
consecutive weights along the input dimension are pruned (2:4, 4:8 = 50%; 3:4 = 75%; 7:8 =
87.5%). Unstructured pruning removes exactly round(sparsity * W.numel()) weights.

* magnitude: the smallest |W| of the matrix (per group for N:M).
* Wanda (Sun et al. 2023): score |W_ij| * ||X_j||, compared within each output row.
* SparseGPT (Frantar & Alistarh 2023): with the Hessian H = 2 X X^T of the layer's inputs,
  dampened, inverted through Cholesky, columns are pruned left to right in blocks, each
  pruned weight's error spread over the columns not yet visited (optimal brain surgeon).
  The mask is chosen per block by w^2 / [H^-1]_jj^2, adaptively as in the reference code.
"""

from __future__ import annotations

import torch

from .spec import Pattern


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` lowest entries of `scores` (ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        mask[torch.topk(scores.flatten(), count, largest=False).indices] = True
    return mask.view_as(scores)


def _n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask of the N lowest scores in every group of M consecutive columns."""
    rows, cols = scores.shape
    if cols % m:
        raise ValueError(f"{cols} input features are not a multiple of M = {m}")
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(2, torch.topk(groups, n, dim=2, largest=False).indices, True)
    return mask.reshape(rows, cols)


def magnitude_prune(weight: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    scores = weight.abs().float()
    if pattern.structured:
        mask = _n_of_m(scores, pattern.n, pattern.m)
    else:
        mask = _lowest(scores, round(pattern.sparsity * weight.numel()))
    return weight.masked_fill(mask, 0)


def wanda_prune(weight: torch.Tensor, input_sq_norms: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """`input_sq_norms[j]` = sum over calibration tokens of x_j^2 (the diagonal of X X^T)."""
    scores = weight.abs().float() * input_sq_norms.float().clamp_min(0).sqrt().unsqueeze(0)
    if pattern.structured:
        mask = _n_of_m(scores, pattern.n, pattern.m)
    else:  # per output row, as in the Wanda paper; the total stays exact
        rows, cols = weight.shape
        total = round(pattern.sparsity * weight.numel())
        per_row = [(total * (r + 1)) // rows - (total * r) // rows for r in range(rows)]
        order = torch.argsort(scores, dim=1)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for r, count in enumerate(per_row):
            mask[r, order[r, :count]] = True
    return weight.masked_fill(mask, 0)


def sparsegpt_prune(
    weight: torch.Tensor, hessian: torch.Tensor, pattern: Pattern, *, blocksize: int = 128, damp: float = 0.01
) -> torch.Tensor:
    """SparseGPT on one matrix; `hessian` is X X^T (any positive scale) over calibration inputs.

    Computes in float64 when given a float64 Hessian, else in float32 (see `layerwise` for why).
    """
    work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
    W = weight.detach().clone().to(work)
    rows, cols = W.shape
    H = hessian.detach().clone().to(work)
    if pattern.structured and blocksize % pattern.m:
        raise ValueError(f"blocksize {blocksize} must be a multiple of M = {pattern.m}")
    dead = torch.diag(H) == 0  # inputs that never fire: their weights go, at no cost
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    total = round(pattern.sparsity * W.numel())
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if pattern.structured:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        else:  # this block's share of the exact total, by cumulative rounding
            k = (total * i2) // cols - (total * i1) // cols
            mask1 = _lowest(W1**2 / d.unsqueeze(0) ** 2, k)
        for i in range(count):
            if pattern.structured and i % pattern.m == 0:
                scores = W1[:, i : i + pattern.m] ** 2 / d[i : i + pattern.m].unsqueeze(0) ** 2
                mask1.scatter_(1, i + torch.topk(scores, pattern.n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype)
