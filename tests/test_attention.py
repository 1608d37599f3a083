"""The fused biased causal attention against attention written out, values and gradients."""

import torch
from helpers import tiny_base
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from mops_core.attention import PAD, biased_causal_attention, key_bias, layer_inputs, mops_attention, use_mops_attention


def written_out(q, k, v, bias, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale + bias.float()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v.float()


def inputs(dtype, *, batch=2, heads=6, kv_heads=2, length=19, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, h, length, dim, generator=g).to(dtype).requires_grad_() for h in (heads, kv_heads, kv_heads))
    padding = torch.ones(batch, length - 5, dtype=torch.long)
    padding[0, -4:] = 0  # the first sample right-padded
    bias = (key_bias(padding, 4) + 2 * torch.randn(batch, 1, 1, length, generator=g)).requires_grad_()
    return q, k, v, bias


def gradients(out, tensors):
    grads = torch.autograd.grad(out.float().pow(2).sum(), tensors)
    return [g.float() for g in grads]


def test_float32_values_and_gradients_equal_attention_written_out():
    q, k, v, bias = inputs(torch.float32)
    scale = q.shape[-1] ** -0.5
    fused, reference = biased_causal_attention(q, k, v, bias, scale), written_out(q, k, v, bias, scale)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(gradients(fused, (q, k, v, bias)), gradients(reference, (q, k, v, bias))):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


class Attention(torch.nn.Module):  # what transformers' sdpa reads of a layer's attention module
    is_causal = True

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


def through_the_layer(q, k, v, bias, scale):
    """What a decoder layer computes from `layer_inputs`, as `mops_attention` receives them."""
    attention = layer_inputs(bias, q.dtype)
    out = mops_attention(Attention(q.shape[1] // k.shape[1]), q, k, v, attention.pop("attention_mask"), scaling=scale, **attention)[0]
    return out.transpose(1, 2)


def test_the_layers_inputs_follow_autograd():
    """While autograd records or the layers run compiled, the per-key bias itself; eager without autograd,
    the dense causal mask built once for every layer."""
    _, _, _, bias = inputs(torch.float32)
    assert layer_inputs(bias, torch.float32) == {"attention_mask": None, "key_bias": bias}
    with torch.no_grad():
        assert layer_inputs(bias, torch.bfloat16, compiled=True) == {"attention_mask": None, "key_bias": bias}
        mask = layer_inputs(bias, torch.bfloat16)["attention_mask"]
    length = bias.shape[-1]
    assert mask.shape == (2, 1, length, length) and mask.dtype == torch.bfloat16
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    torch.testing.assert_close(mask[:, :, causal], bias.to(torch.bfloat16).expand(-1, -1, length, -1)[:, :, causal])
    assert (mask[:, :, ~causal] == torch.finfo(torch.bfloat16).min).all()


def test_without_autograd_the_same_values():
    """Evaluation's dense mask through transformers' sdpa computes the same attention as training's folded bias."""
    q, k, v, bias = inputs(torch.float32)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        plain = through_the_layer(q, k, v, bias, scale)
    torch.testing.assert_close(plain, written_out(q, k, v, bias, scale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain, through_the_layer(q, k, v, bias, scale).detach(), atol=1e-5, rtol=1e-5)


def test_the_fused_kernel_is_the_one_that_runs():
    """The fused kernel, forward and backward: q, k and v of one head dimension, no mask carrying a gradient."""
    q, k, v, bias = inputs(torch.float32)
    with torch.profiler.profile() as profile:
        gradients(through_the_layer(q, k, v, bias, 0.25), (q, k, v, bias))
        with torch.no_grad():
            through_the_layer(q, k, v, bias, 0.25)
    kernels = {e.key for e in profile.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    assert kernels == {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}, kernels


def test_bfloat16_within_its_precision():
    q, k, v, bias = inputs(torch.bfloat16)
    scale = q.shape[-1] ** -0.5
    fused, reference = biased_causal_attention(q, k, v, bias, scale).float(), written_out(q, k, v, bias, scale)
    assert (fused - reference).abs().max() < 0.03
    ours, theirs = gradients(fused, (bias,))[0], gradients(reference, (bias,))[0]
    assert (ours - theirs).norm() / theirs.norm() < 0.03


def test_padded_keys_get_no_attention():
    q, k, v, bias = inputs(torch.float32)
    assert bias[0, 0, 0, -4:].max() < PAD / 2 and bias[1].min() > PAD / 2
    v = v.detach().clone()
    out = biased_causal_attention(q, k, v, bias, 0.25)
    v[0, :, -4:] = 1e6  # whatever the padded keys carry
    torch.testing.assert_close(biased_causal_attention(q, k, v, bias, 0.25), out)


def test_without_a_key_bias_the_base_gets_transformers_sdpa():
    base = tiny_base(64, layers=2)
    use_mops_attention(base)
    assert base.config._attn_implementation == "mops"
    module, config = base.model.layers[0].self_attn, base.config
    q, k, v, _ = inputs(torch.float32, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, dim=module.head_dim)
    mask = torch.zeros(2, 1, 19, 19).masked_fill(~torch.ones(19, 19, dtype=torch.bool).tril(), float("-inf"))
    ours = mops_attention(module, q, k, v, mask, scaling=0.25)[0]
    torch.testing.assert_close(ours, sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0])
    ids = torch.randint(0, 64, (1, 7))
    before = base(input_ids=ids).logits  # transformers' own forward (its masks, is_causal) is unchanged
    base.set_attn_implementation("sdpa")
    torch.testing.assert_close(before, base(input_ids=ids).logits)


def test_fewer_queries_than_keys_are_the_last_positions():
    """The queries after a prefix (`MoPsModel.lower_prefix`) attend as the same rows of the whole sequence would,
    whether the prefix's keys come with the call or already lead `key`, through the per-key bias or the dense mask."""
    q, k, v, bias = (t.detach() for t in inputs(torch.float32))
    scale, before = 0.25, 6
    whole = written_out(q, k, v, bias, scale)[:, :, before:].transpose(1, 2)
    with torch.no_grad():
        led = mops_attention(None, q[:, :, before:], k, v, None, scaling=scale, key_bias=bias)[0]
        prefix = (k[:1, :, :before], v[:1, :, :before])  # one sample's, as the model keeps it
        k2, v2 = k.clone(), v.clone()
        k2[1:, :, :before], v2[1:, :, :before] = prefix[0], prefix[1]
        whole2 = written_out(q, k2, v2, bias, scale)[:, :, before:].transpose(1, 2)
        given = mops_attention(None, q[:, :, before:], k2[:, :, before:], v2[:, :, before:], None, scaling=scale, key_bias=bias, prefix=prefix)[0]
        base = tiny_base(64, layers=2)
        module = base.model.layers[0].self_attn
        q3, k3, v3, bias3 = (t.detach() for t in inputs(torch.float32, heads=base.config.num_attention_heads,
                                                      kv_heads=base.config.num_key_value_heads, dim=module.head_dim))
        mask = layer_inputs(bias3, torch.float32, queries=q3.shape[2] - before)["attention_mask"]
        assert mask.shape == (2, 1, q3.shape[2] - before, q3.shape[2])
        dense = mops_attention(module, q3[:, :, before:], k3, v3, mask, scaling=scale)[0]
    torch.testing.assert_close(led, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(given, whole2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, written_out(q3, k3, v3, bias3, scale)[:, :, before:].transpose(1, 2), atol=1e-5, rtol=1e-5)
