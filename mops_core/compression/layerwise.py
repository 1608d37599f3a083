"""Prune a LLaMA-family model one decoder block at a time, as SparseGPT and Wanda do.

Calibration sequences enter block 0 as embeddings. For each block: record X X^T of the inputs
of its seven linear layers (forward hooks), prune them, then run the block again, now pruned,
to produce the next block's inputs, so that each block is fitted to what the pruned blocks
below it actually send.

All of that runs in `dtype` (float64 by default), the block cast up while it is pruned and back
after. SparseGPT's solve amplifies rounding by orders of magnitude (H^-1 of correlated
activations), and each block is fitted to the last one's pruned outputs, so in float32 the order
in which the threads sum (their number, the CPU) decides a few percent of the mask and the
perplexity with it; float64 brings bases pruned on different machines closer, not equal (docs/compression.md).
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
    dtype: torch.dtype = torch.float64,
    batch_size: int = 8,
    progress: bool = True,
) -> list[MatrixStats]:
    """Prune every linear layer of every decoder block in place; `calibration` is (n, length) token ids."""
    inner = model.model
    device = inner.embed_tokens.weight.device
    if spec.calibrated and calibration is None:
        raise ValueError(f"{spec.method} needs calibration sequences")
    if spec.calibrated:
        hidden = [inner.embed_tokens(chunk.to(device)).to(dtype) for chunk in calibration.split(batch_size)]
        positions = torch.arange(calibration.shape[1], device=device).unsqueeze(0)
        rotary = inner.rotary_emb(hidden[0], positions)

    def run(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:  # causal: sdpa with no mask
        return layer(h, attention_mask=None, position_embeddings=rotary, position_ids=positions)

    stats: list[MatrixStats] = []
    for index, layer in enumerate(tqdm(inner.layers, desc=f"{spec.method} pruning", unit="layer", disable=not progress)):
        linears = block_linears(layer)
        grams: dict[str, torch.Tensor] = {}
        if spec.calibrated:
            stored = next(layer.parameters()).dtype
            layer.to(dtype)  # exact both ways for float32/bfloat16 weights
            hooks = []
            for name, linear in linears.items():
                grams[name] = torch.zeros(linear.in_features, linear.in_features, device=device, dtype=dtype)

                def accumulate(module, inputs, output, name=name):
                    x = inputs[0].reshape(-1, inputs[0].shape[-1])
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
            layer.to(stored)
    return stats
