"""The attention of MoPs' forward: causal, plus one additive bias per key.

Every layer MoPs runs attends causally with one extra term per key, the same for every query
and head: log(gain g_e) on expert e's prompt keys, a large negative number on right padding, 0
elsewhere. Handed to PyTorch as a dense (B, 1, S, S) mask while autograd records, that term
sends PyTorch's CPU attention to its math kernel (explicit bmm and softmax, and an (S, S) mask
gradient per layer): the fused kernel has no backward with a mask. While training, the bias
rides in one extra head dimension instead: with q' = [q, 1], k' = [k, b / scale], v' = [v, 0],

    scale * q'.k' = scale * q.k + b,

so the fused causal kernel (`is_causal=True`) computes exactly that logit, b's gradient reaches
it through k', and the output's extra column is dropped. (The fused kernel needs q, k and v of
one head dimension: a value left at 64 would send it back to the math kernel.) Eager without
autograd, the fused kernel takes a dense mask, which is cheaper than the wider heads: then
`layer_inputs` builds that mask once per forward and the layers get it as their ordinary
`attention_mask`.

Under torch.compile (`compiled.py`) attention is written out instead -- q k^T, the bias, the causal
mask, softmax in float32, times v -- which inductor fuses into a few kernels, faster than either
fused-kernel path on CPU, in bfloat16 above all; the layers then get the per-key bias with or
without autograd, never the dense mask.

Registered in transformers' AttentionInterface as "mops": a layer called with `key_bias` gets
the attention above; called without it (no autograd, generation, anything else sharing the
base) it gets transformers' own sdpa attention, unchanged. A layer called with `prefix` attends
to those keys and values before its own: the sink's and P1's in the lower layers, the same for
every input (`MoPsModel.lower_prefix`), so that only the text runs there; its queries are then
the last positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "mops"
PAD = -1e4  # a padded key's bias: exp(-1e4) is 0 in float32, as the most negative float would give


def key_bias(attention_mask: torch.Tensor, num_prompts: int) -> torch.Tensor:
    """(B, 1, 1, S) float32 for the sequence [sink] [K prompts] [text]: 0 on every key, PAD on padding."""
    present = F.pad(attention_mask.bool(), (1 + num_prompts, 0), value=True)
    return torch.where(present, 0.0, PAD).to(torch.float32)[:, None, None, :]


def layer_inputs(bias: torch.Tensor, dtype: torch.dtype, *, compiled: bool = False, queries: int | None = None) -> dict[str, torch.Tensor | None]:
    """The attention arguments every layer of one forward gets, built once: the (B, 1, 1, S) per-key
    bias while autograd records (folded into the heads, layer by layer) or when the layers run
    `compiled` (written out); otherwise the dense causal mask holding it, (B, 1, Q, S) in the
    layers' dtype, for transformers' sdpa to hand to the fused kernel. The Q `queries` are the
    last of the S positions (S by default; fewer after a prefix whose keys the layers are given)."""
    if torch.is_grad_enabled() or compiled:
        return {"attention_mask": None, "key_bias": bias}
    length = bias.shape[-1]
    queries = length if queries is None else queries
    causal = torch.ones(queries, length, dtype=torch.bool, device=bias.device).tril(length - queries)
    return {"attention_mask": bias.to(dtype).masked_fill(~causal, torch.finfo(dtype).min)}


def biased_causal_attention(query, key, value, bias, scale: float) -> torch.Tensor:
    """softmax(scale * q k^T + bias, causal) v for (B, H, S, D) query and (B, H_kv, S, D) key and value,
    through the fused causal kernel forward and backward, `bias` (B, 1, 1, S) receiving its gradient."""
    folded = (bias / scale).to(key.dtype).transpose(-1, -2).expand(-1, key.shape[1], -1, -1)  # (B, H_kv, S, 1)
    query = torch.cat([query, torch.ones_like(query[..., :1])], -1)
    key = torch.cat([key, folded], -1)
    out = F.scaled_dot_product_attention(query, key, F.pad(value, (0, 1)), is_causal=True, scale=scale, enable_gqa=True)
    return out[..., :-1]


def written_out_attention(query, key, value, bias, scale: float) -> torch.Tensor:
    """The same attention as `biased_causal_attention`, written out for inductor to fuse: logits and
    softmax in float32 (as the fused kernel accumulates), the probabilities cast back for the product with v.
    The queries may be fewer than the keys: they are the last positions, after a prefix's keys."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    keys = torch.arange(key.shape[2], device=query.device)
    queries = keys[key.shape[2] - query.shape[2] :]
    # The causal mask as a comparison of positions, not a stored (S, S) tensor: inductor computes it
    # inside the softmax's kernels, forward and backward, instead of loading a mask saved for backward.
    future = keys[None, :] > queries[:, None]
    logits = (query @ key.transpose(-1, -2)).float() * scale + bias
    weights = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
    return weights.to(value.dtype) @ value


def mops_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                   key_bias: torch.Tensor | None = None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs):
    if prefix is not None:  # keys and values of positions before these, the same for every sample (`MoPsModel.lower_prefix`)
        key = torch.cat([prefix[0].expand(key.shape[0], -1, -1, -1), key], dim=2)
        value = torch.cat([prefix[1].expand(value.shape[0], -1, -1, -1), value], dim=2)
    if key_bias is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # The fused causal kernel aligns fewer queries than keys to the first keys, not the last.
    fused = not torch.compiler.is_compiling() and query.shape[2] == key.shape[2]
    attend = biased_causal_attention if fused else written_out_attention
    out = attend(query, key, value, key_bias, scale)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, mops_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # transformers' own masks, when it builds them, are sdpa's


def use_mops_attention(base: PreTrainedModel) -> None:
    """Route the base's attention through `mops_attention` (sdpa for any call without `key_bias`)."""
    if base.config._attn_implementation != NAME:
        base.set_attn_implementation(NAME)
