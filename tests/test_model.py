"""The MoPs forward against references computed another way, on tiny random LLaMA models."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_base

from mops_core.config import MoPsConfig
from mops_core.data import Example, collate
from mops_core.model import MoPsModel


def make_model(tokenizer, *, layers=4, inject=2, experts=3, per_expert=2, gating="attention", method="mops", seed=0):
    base = tiny_base(len(tokenizer), layers=layers, seed=seed)
    cfg = MoPsConfig(method=method, gating=gating, experts=experts, prompts_per_expert=per_expert, inject_layer=inject, gate_hidden=16)
    torch.manual_seed(seed + 1)
    model = MoPsModel(base, cfg, sink_token_id=tokenizer.bos_token_id)
    with torch.no_grad():
        model.input_prompts.normal_(0, 0.05)
        model.prompts.normal_(0, 1.0)
        if model.gate is not None:
            # A gate far from uniform, so that its effect is visible.
            model.gate.fc2.weight.normal_(0, 2.0)
            model.gate.fc2.bias.normal_(0, 1.0)
    return model


def batch_of(tokenizer, texts, question_lens):
    examples = []
    for text, q in zip(texts, question_lens):
        ids = tuple(tokenizer(text, add_special_tokens=False).input_ids)
        examples.append(Example(ids, q, 0))
    return collate(examples, tokenizer.pad_token_id)


TEXTS = ["the quick brown fox jumps", "hello there", "a much longer sample with several words in it"]
QLENS = [10, 6, 20]


def rope(positions, head_dim, theta):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_layer(layer, hidden, allowed, key_weight, cos, sin):
    """A LLaMA block written out by hand; attention weights to each key multiplied by `key_weight`, renormalised."""
    attn = layer.self_attn
    batch, length, _ = hidden.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch, length, -1, head_dim).transpose(1, 2)
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1) * key_weight[:, None, None, :]
    weights = weights / weights.sum(-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, -1)
    hidden = hidden + attn.o_proj(out)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def reference_forward(model, batch, *, use_gate=True):
    """MoPs written plainly: no masks, no transformers attention; g multiplies attention to each expert's prompts."""
    entering = model.entering(batch["input_ids"], batch["attention_mask"])
    hidden = entering.clone()
    b, length, _ = hidden.shape
    k = model.num_prompts
    hidden[:, 1 : 1 + k] = model.prompts.reshape(k, -1)
    key_weight = torch.ones(b, length)
    if use_gate:
        x = model.gate_input(entering, batch["question_mask"])
        x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        g = torch.softmax(model.gate.fc2(torch.relu(model.gate.fc1(x))), dim=-1)
        key_weight[:, 1 : 1 + k] = model.gate.gain * g.repeat_interleave(model.prompts_per_expert, dim=1)
    valid = torch.cat([torch.ones(b, 1 + k, dtype=torch.bool), batch["attention_mask"].bool()], 1)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
    config = model.base.config
    cos, sin = rope(torch.arange(length), config.head_dim, config.rope_parameters["rope_theta"])
    for layer in model.base.model.layers[model.inject_layer :]:
        hidden = reference_layer(layer, hidden, allowed, key_weight, cos, sin)
    logits = model.base.lm_head(model.base.model.norm(hidden))
    return logits[:, k : length - 1]


@torch.no_grad()
def test_without_prompts_reproduces_the_plain_model(tokenizer):
    for gating in ("attention", "none"):
        model = make_model(tokenizer, per_expert=0, gating=gating)
        batch = batch_of(tokenizer, TEXTS, QLENS)
        out = model(**batch, return_logits=True)
        sink = torch.full((3, 1), tokenizer.bos_token_id)
        plain = model.base(
            input_ids=torch.cat([sink, batch["input_ids"]], 1),
            attention_mask=torch.cat([torch.ones(3, 1, dtype=torch.long), batch["attention_mask"]], 1),
        ).logits[:, :-1]  # position p predicts token p + 1: these predict the text tokens
        real = batch["attention_mask"].bool()
        torch.testing.assert_close(out.logits[:, :-1][real], plain[real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_attention_gating_matches_handwritten_reweighted_attention(tokenizer):
    model = make_model(tokenizer)
    batch = batch_of(tokenizer, TEXTS, QLENS)
    out = model(**batch, return_logits=True)
    expected = reference_forward(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[:, :-1][real], expected[real], atol=1e-4, rtol=1e-4)
    # And the gate really is far from uniform, so the test has teeth.
    assert out.gate.max() > 2.0 / model.experts
    with pytest.raises(TypeError, match="retrun_logits"):  # a misspelt option is refused, not ignored
        model(**batch, retrun_logits=True)


def test_gradients_match_the_handwritten_reference(tokenizer):
    """The prompts' and the gate's gradients through the fused attention equal those of attention written out."""
    model = make_model(tokenizer)
    batch = batch_of(tokenizer, TEXTS, QLENS)
    real = batch["attention_mask"].bool()

    def grads(logits):
        model.zero_grad(set_to_none=True)
        (logits[real].logsumexp(-1) - logits[real][:, 0]).sum().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    ours, theirs = grads(model(**batch, return_logits=True).logits[:, :-1]), grads(reference_forward(model, batch))
    assert ours.keys() == theirs.keys() and "prompts" in ours and "gate.fc1.weight" in ours
    for name in ours:
        assert theirs[name].abs().max() > 0, name
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4, msg=name)


@torch.no_grad()
def test_no_gating_equals_reference_with_unit_weights(tokenizer):
    model = make_model(tokenizer, gating="none")
    assert model.gate is None
    batch = batch_of(tokenizer, TEXTS, QLENS)
    out = model(**batch, return_logits=True)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[:, :-1][real], reference_forward(model, batch, use_gate=False)[real], atol=1e-4, rtol=1e-4)
    assert out.gate is None


@torch.no_grad()
def test_prompt_method_ignores_the_gating_setting(tokenizer):
    model = make_model(tokenizer, method="prompt", gating="attention")
    assert model.gating == "none" and model.gate is None


def _logit_change(tokenizer, gating, layers, inject, *, near_uniform=False):
    """Mean |logit change| that gating causes, against the same prompts without a gate."""
    gated = make_model(tokenizer, layers=layers, inject=inject, gating=gating)
    gated.prompts.data.mul_(20.0)  # hidden-state scale, where RMSNorm's eps is negligible
    if near_uniform:  # g about 1/E, as right after initialisation
        gated.gate.fc2.weight.data.mul_(0.05)
        gated.gate.fc2.bias.data.zero_()
    plain = make_model(tokenizer, layers=layers, inject=inject, gating="none")
    plain.prompts.data.copy_(gated.prompts.data)
    plain.input_prompts.data.copy_(gated.input_prompts.data)
    batch = batch_of(tokenizer, TEXTS, QLENS)
    real = batch["attention_mask"].bool()
    diff = gated(**batch, return_logits=True).logits - plain(**batch, return_logits=True).logits
    return diff[:, :-1][real].abs().mean().item()


@torch.no_grad()
def test_hidden_mode_barely_reaches_attention(tokenizer):
    # One layer after injection: RMSNorm(g * x) == RMSNorm(x), so the literal product changes
    # the keys and values of the prompts by RMSNorm's eps only.
    one_layer = _logit_change(tokenizer, "attention", layers=4, inject=3)
    assert one_layer > 1e-3
    assert _logit_change(tokenizer, "hidden", layers=4, inject=3) < 1e-2 * one_layer
    # Deeper, the product compounds through the residual stream (g^n); for a gate near 1/E it
    # still moves the outputs far less than log-g attention does. (A sharp gate drives the
    # unchosen prompts' residual towards zero instead: the literal mode is an ablation.)
    attention = _logit_change(tokenizer, "attention", 6, 2, near_uniform=True)
    hidden = _logit_change(tokenizer, "hidden", 6, 2, near_uniform=True)
    assert hidden < 0.1 * attention, (hidden, attention)


def test_gradients_reach_only_prompts_and_gate(tokenizer):
    model = make_model(tokenizer)
    seen = []
    for i, layer in enumerate(model.base.model.layers):
        layer.register_forward_hook(lambda mod, args, out, i=i: seen.append((i, torch.is_grad_enabled(), out.requires_grad)))
    batch = batch_of(tokenizer, TEXTS, QLENS)
    model(**batch).loss.backward()
    lower = [s for s in seen if s[0] < model.inject_layer]
    upper = [s for s in seen if s[0] >= model.inject_layer]
    assert lower and not any(grad or req for _, grad, req in lower), "layers below L_int must run without autograd"
    assert upper and all(req for _, _, req in upper)
    for name, param in model.named_parameters():
        trainable = name == "prompts" or name.startswith("gate.")
        if trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, f"{name} must not receive gradients"


@torch.no_grad()
def test_padded_batch_matches_samples_run_alone(tokenizer):
    model = make_model(tokenizer)
    together = model(**batch_of(tokenizer, TEXTS, QLENS))
    for i, (text, q) in enumerate(zip(TEXTS, QLENS)):
        alone = model(**batch_of(tokenizer, [text], [q]))
        torch.testing.assert_close(together.gate[i], alone.gate[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.nll[i], alone.nll[0], atol=1e-4, rtol=1e-5)
        assert together.tokens[i] == alone.tokens[0]


@torch.no_grad()
def test_gate_reads_question_only_and_sink_is_never_gated(tokenizer):
    model = make_model(tokenizer)
    a = batch_of(tokenizer, ["same question, answer one"], [14])
    b = batch_of(tokenizer, ["same question, other reply"], [14])
    torch.testing.assert_close(model(**a).gate, model(**b).gate)  # responses differ, the gate does not
    c = batch_of(tokenizer, ["other question, answer one"], [14])
    assert not torch.allclose(model(**a).gate, model(**c).gate)

    out = model(**batch_of(tokenizer, TEXTS, QLENS))
    log_g = F.log_softmax(out.gate_logits, -1)
    length, k = 30, model.num_prompts
    bias = model.gate_bias(log_g, length)[:, 0, 0]
    assert (bias[:, 0] == 0).all(), "the sink must never be gated"
    assert (bias[:, 1 + k :] == 0).all(), "text keys must never be gated"
    torch.testing.assert_close(bias[:, 1 : 1 + k], (log_g + math.log(model.gate.gain)).repeat_interleave(model.prompts_per_expert, 1))
    scale = model.prompt_scale(log_g.exp(), length)[..., 0]
    assert (scale[:, 0] == 1).all() and (scale[:, 1 + k :] == 1).all()


@torch.no_grad()
def test_initial_prompts_reproduce_the_input_prompt_model(tokenizer):
    model = make_model(tokenizer, gating="none")
    model.init_prompts_from_input()
    batch = batch_of(tokenizer, TEXTS, QLENS)
    injected = model(**batch, return_logits=True).logits[:, :-1]
    plain = model(**batch, inject=False, return_logits=True).logits[:, :-1]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(injected[real], plain[real], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_lower_layers_run_the_text_after_one_shared_prefix(tokenizer):
    """`entering` (the text alone through the lower layers, after the sink's and P1's keys and values,
    computed once) equals the whole sequence through them written plainly; a new P1 is a new prefix."""
    model = make_model(tokenizer, layers=4, inject=3)
    batch = batch_of(tokenizer, TEXTS, QLENS)
    config, k = model.base.config, model.num_prompts

    def plainly():
        hidden = model.embed(batch["input_ids"])
        b, length, _ = hidden.shape
        valid = torch.cat([torch.ones(b, 1 + k, dtype=torch.bool), batch["attention_mask"].bool()], 1)
        allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
        cos, sin = rope(torch.arange(length), config.head_dim, config.rope_parameters["rope_theta"])
        for layer in model.base.model.layers[: model.inject_layer]:
            hidden = reference_layer(layer, hidden, allowed, torch.ones(b, length), cos, sin)
        return hidden, valid

    for _ in range(2):
        expected, real = plainly()
        torch.testing.assert_close(model.entering(batch["input_ids"], batch["attention_mask"])[real], expected[real], atol=1e-5, rtol=1e-5)
        model.prompt_states().add_(1.0)  # what a caller gets is its own: the kept prefix stays as computed
        model.entering(batch["input_ids"][:, :0], batch["attention_mask"][:, :0]).add_(1.0)
        torch.testing.assert_close(model.prompt_states(), expected[0, 1 : 1 + k], atol=1e-5, rtol=1e-5)
        model.input_prompts.copy_(torch.randn_like(model.input_prompts))


def test_inject_layer_bounds():
    with pytest.raises(ValueError, match="inject-layer"):
        MoPsConfig(inject_layer=9).resolve_inject_layer(8)
    assert MoPsConfig().resolve_inject_layer(30) == 9
    assert MoPsConfig().resolve_inject_layer(32) == 9  # the paper's L_int = 10 of 32, counted from 1


def test_the_shape_settings_shape_the_adapter(tokenizer):
    model = make_model(tokenizer, experts=4, per_expert=3)
    cfg = MoPsConfig(experts=4, prompts_per_expert=3, inject_layer=2, gate_hidden=24)
    wider = MoPsModel(tiny_base(len(tokenizer)), cfg, sink_token_id=tokenizer.bos_token_id)
    assert model.prompts.shape == (4, 3, model.width) and model.input_prompts.shape == (12, model.width)
    assert model.gate.fc1.out_features == 16 and wider.gate.fc1.out_features == 24  # gate-hidden
    assert model.gate.fc2.out_features == 4
