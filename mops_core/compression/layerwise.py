"""Prune a LLaMA-family model one decoder block at a time, as SparseGPT and Wanda do.

Calibration sequences enter block 0 as embeddings. For each block: record X X^T of the inputs
of its seven linear layers (forward hooks), prune them, then run the block again, now pruned,
to produce the next block's inputs, so that each block is fitted to what the pruned blocks
below it actually send.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .int8 import LINEARS
from .pruners import magnitude_prune, sparsegpt_prune, wanda_prune
from .spec import CompressionSpec


@dataclass
class MatrixStats:
    layer: int
    name: str
    zeros: int
    numel: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


def block_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    found = {}
    for parent in (layer.self_attn, layer.mlp):
        for name in LINEARS:
            module = getattr(parent, name, None)
            if isinstance(module, nn.Linear):
                found[name] = module
    return found


@torch.no_grad()
def prune_model(
    model: nn.Module,
    calibration: torch.Tensor | None,
    spec: CompressionSpec,
    *,
    blocksize: int = 128,
    damp: float = 0.01,
    batch_size: int = 8,
    progress: bool = True,
) -> list[MatrixStats]:
    """Prune every linear layer of every decoder block in place; `calibration` is (n, length) token ids."""
    inner = model.model
    device = inner.embed_tokens.weight.device
    if spec.calibrated and calibration is None:
        raise ValueError(f"{spec.method} needs calibration sequences")
    if spec.calibrated:
        hidden = [inner.embed_tokens(chunk.to(device)) for chunk in calibration.split(batch_size)]
        positions = torch.arange(calibration.shape[1], device=device).unsqueeze(0)
        rotary = inner.rotary_emb(hidden[0], positions)

    def run(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:  # causal: sdpa with no mask
        return layer(h, attention_mask=None, position_embeddings=rotary, position_ids=positions)

    stats: list[MatrixStats] = []
    for index, layer in enumerate(tqdm(inner.layers, desc=f"{spec.method} pruning", unit="layer", disable=not progress)):
        linears = block_linears(layer)
        grams: dict[str, torch.Tensor] = {}
        if spec.calibrated:
            hooks = []
            for name, linear in linears.items():
                grams[name] = torch.zeros(linear.in_features, linear.in_features, device=device)

                def accumulate(module, inputs, output, name=name):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
                    grams[name].add_(x.T @ x)

                hooks.append(linear.register_forward_hook(accumulate))
            try:
                for h in hidden:
                    run(layer, h)
            finally:
                for hook in hooks:
                    hook.remove()
        for name, linear in linears.items():
            weight = linear.weight
            if spec.method == "magnitude":
                pruned = magnitude_prune(weight, spec.pattern)
            elif spec.method == "wanda":
                pruned = wanda_prune(weight, torch.diag(grams[name]), spec.pattern)
            else:
                pruned = sparsegpt_prune(weight, grams[name], spec.pattern, blocksize=blocksize, damp=damp)
            weight.copy_(pruned.to(weight.dtype))
            stats.append(MatrixStats(index, name, int((weight == 0).sum()), weight.numel()))
        if spec.calibrated:
            hidden = [run(layer, h) for h in hidden]
    return stats
