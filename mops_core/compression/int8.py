"""int8 weights for the frozen base, with gradients still flowing to the inputs (the prompts).

* CUDA with bitsandbytes installed: LLM.int8() proper (Dettmers et al. 2022), `Linear8bitLt`
  with the outlier threshold 6.0: vector-wise int8 matmuls plus an fp16 path for outlier
  features.
* Otherwise (a CPU): weights stored as int8 with one absmax scale per output row (LLM.int8()'s
  vector-wise quantisation, without the outlier path), dequantised inside `forward`. A quarter
  of the memory; autograd sees an ordinary matmul, so prompts above still train. torch's own
  `_weight_int8pack_mm` is far slower than fp32 at SmolLM2's shapes, and torchao's int8
  weight-only config pulls noisy CUDA-library loads into every transformers import, so neither
  is used.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Int8Linear(nn.Module):
    """A frozen linear layer whose weight is int8 with a per-output-row absmax scale."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_int8", torch.round(weight / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8))
        self.register_buffer("weight_scale", scale.to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype).unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def _bitsandbytes_linear(linear: nn.Linear) -> nn.Module | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False, threshold=6.0
    )
    layer.weight = bnb.nn.Int8Params(linear.weight.detach().to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().to(torch.float16), requires_grad=False)
    return layer.to(linear.weight.device)  # quantises on the move to CUDA


def quantize_int8(model: nn.Module) -> str:
    """Replace every linear layer of the decoder blocks (not embeddings, not the head); returns the backend."""
    device = next(model.parameters()).device
    use_bnb = device.type == "cuda"
    backend = "bitsandbytes LLM.int8()" if use_bnb else "int8 weight-only (per-row absmax)"
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in LINEARS:
                linear = getattr(parent, name, None)
                if not isinstance(linear, nn.Linear):
                    continue
                replacement = _bitsandbytes_linear(linear) if use_bnb else None
                if use_bnb and replacement is None:
                    log.warning("bitsandbytes is not installed; using int8 weight-only layers on CUDA")
                    use_bnb, backend = False, "int8 weight-only (per-row absmax)"
                setattr(parent, name, replacement or Int8Linear(linear))
    model.requires_grad_(False)
    return backend
