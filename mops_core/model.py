"""Mixture of Prompts (Dun et al., Algorithm 1) over a frozen LLaMA-family causal LM.

    [sink] [P_1 .. P_K] [question] [response] [padding]      layers 0 .. L_int-1: frozen, no autograd
    [sink] [E_1 .. E_E] [question] [response] [padding]      layers L_int .. L-1: attention to expert
           (K/E trainable prompts each)                       e's prompts x gain g_e(question)

The sink (the BOS token) stays first and is never gated: LLaMA models park attention there. The
gate reads the question's states entering `inject_layer` (never the response, which does not
exist at inference). `gating="attention"` adds log(gain g_e) to every attention logit towards
expert e's prompt keys: a per-key bias handed to transformers' own decoder layers, which the
fused causal kernel applies (`attention.py`);
`"hidden"` is the paper's literal product on the prompts' states (under pre-norm it barely
reaches attention); `"none"` is the prompt-tuning baseline. Prompts precede the text in a causal
model, so their states entering `inject_layer` do not depend on the input:
`init_prompts_from_input` starts the experts there, exactly at the input-prompt-tuned model.
For the same reason the lower layers run the sink and P1 once (`lower_prefix`), and each input's
text alone after them, attending to their keys and values.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from . import compiled
from .attention import key_bias, layer_inputs, use_mops_attention
from .config import MoPsConfig
from .labels import IGNORE_INDEX

# Names of MoPs' tensors, the same in the model, the checkpoint and the federated messages.
INPUT_PROMPTS = "input_prompts"  # frozen after pretraining; never travels
PROMPTS = "prompts"
GATE_PREFIX = "gate."


def is_federated_key(name: str) -> bool:
    """What the server sends and averages: the experts and the gate (its input statistics, fixed
    after pretraining, ride along and average to themselves)."""
    return name == PROMPTS or name.startswith(GATE_PREFIX)


class Gate(nn.Module):
    """log g = floor(log_softmax(W2 relu(W1 norm(x)))); gain g_e weighs expert e's prompts.

    `norm`: a few hidden dimensions dwarf the rest, and the task signal sits in the small ones:
    'rms' (unit RMS), 'none', or 'standardise' (each dimension by its mean and spread over the
    gate-pretraining instructions; buffers that travel with the gate and never train). `gain` E
    makes a uniform gate weigh every prompt 1, as the ungated baseline does; 1 is the paper's.
    """

    def __init__(self, width: int, hidden: int, experts: int, *, norm: str = "rms", floor: float = 0.0, gain: float = 1.0):
        super().__init__()
        self.norm, self.floor, self.gain, self.experts = norm, floor, gain, experts
        if norm == "standardise":  # identity until `fit_input_statistics`
            self.register_buffer("input_mean", torch.zeros(width))
            self.register_buffer("input_scale", torch.ones(width))
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, experts)
        nn.init.zeros_(self.fc2.weight)  # every expert starts with the same score, 1/E
        nn.init.zeros_(self.fc2.bias)

    @torch.no_grad()
    def fit_input_statistics(self, feats: torch.Tensor) -> None:
        """Take 'standardise''s per-dimension mean and scale from these gate inputs (N, d)."""
        if self.norm != "standardise":
            return
        if feats.shape[0] < 2 or not torch.isfinite(feats).all():
            raise ValueError(f"standardising the gate's input needs at least 2 finite inputs, got {feats.shape[0]}")
        mean, std = feats.float().mean(0), feats.float().std(0)
        self.input_mean.copy_(mean)
        self.input_scale.copy_(torch.maximum(std, 1e-6 * mean.abs() + 1e-12))  # no blown-up rounding noise

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif self.norm == "standardise":
            x = (x - self.input_mean) / self.input_scale
        return self.fc2(F.relu(self.fc1(x)))

    def log_scores(self, logits: torch.Tensor) -> torch.Tensor:
        log_g = F.log_softmax(logits, dim=-1)
        if self.floor > 0:
            log_g = torch.log(self.floor + (1.0 - self.experts * self.floor) * log_g.exp())
        return log_g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_scores(self.logits(x))


@dataclass
class LowerPrefix:
    """The sink and the K input prompts through the layers below `inject_layer`: they precede the text
    in a causal model, so this is the same for every input, and only the text runs per sample."""

    states: torch.Tensor  # (1 + K, d) entering inject_layer
    keys: list[torch.Tensor]  # per lower layer, (1, kv heads, 1 + K, head dim), rotated as the layer rotates them
    values: list[torch.Tensor]


@dataclass
class MoPsOutput:
    loss: torch.Tensor | None  # mean NLL over the batch's labelled tokens
    nll: torch.Tensor  # (B,) summed NLL of each sample's labelled tokens
    tokens: torch.Tensor  # (B,) labelled tokens of each sample
    gate: torch.Tensor | None  # (B, E) expert scores g, None without gating
    gate_logits: torch.Tensor | None
    logits: torch.Tensor | None = None  # (B, T + 1, V) if asked: [:, j] predicts text token j, [:, T] what follows


class MoPsModel(nn.Module):
    def __init__(self, base: PreTrainedModel, cfg: MoPsConfig, sink_token_id: int):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        use_mops_attention(base)
        self.cfg = cfg
        self.width, self.num_layers = base.config.hidden_size, base.config.num_hidden_layers
        self.inject_layer = cfg.resolve_inject_layer(self.num_layers)
        self.gating = cfg.effective_gating
        self.experts, self.prompts_per_expert, self.num_prompts = cfg.experts, cfg.prompts_per_expert, cfg.num_prompts
        self.sink_token_id = int(sink_token_id)
        self.compile_layers = False  # the decoder layers and the loss through torch.compile (`compiled.py`); eager unless asked
        self.input_prompts = nn.Parameter(torch.zeros(self.num_prompts, self.width), requires_grad=False)
        self.prompts = nn.Parameter(torch.zeros(cfg.experts, cfg.prompts_per_expert, self.width))
        self.gate = None
        if self.gating != "none":
            gain = float(cfg.experts) if cfg.gate_scale == "experts" else 1.0
            self.gate = Gate(self.width, cfg.gate_hidden, cfg.experts, norm=cfg.gate_input_norm, floor=cfg.gate_floor, gain=gain)
        self._lower_prefix: tuple[tuple, LowerPrefix] | None = None  # for the P1 it was computed with

    device = property(lambda self: self.input_prompts.device)
    dtype = property(lambda self: self.base.model.embed_tokens.weight.dtype)  # the frozen base's

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor MoPs adds to the base, parameters and buffers, live (what loads copy into)."""
        return {n: t for n, t in itertools.chain(self.named_parameters(), self.named_buffers()) if not n.startswith("base.")}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach() for name, t in self.adapter_tensors().items()}

    def federated_state_dict(self) -> dict[str, torch.Tensor]:  # what travels each round
        return {k: v for k, v in self.adapter_state_dict().items() if is_federated_key(k)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if is_federated_key(name)]

    @torch.no_grad()
    def prompt_states(self) -> torch.Tensor:
        """(K, d) hidden states of the prompt positions entering `inject_layer` (input-independent)."""
        return self.lower_prefix().states[1:].to(torch.float32, copy=True)  # never the kept prefix itself

    @torch.no_grad()
    def init_prompts_from_input(self) -> None:
        """Start the trainable prompts where the frozen input prompts already are at `inject_layer`."""
        self.prompts.copy_(self.prompt_states().view_as(self.prompts))

    # ------------------------------------------------------------------ the pieces of the forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[sink] [P1] [text] embedded: (B, 1 + K + T, d)."""
        embed, batch = self.base.model.embed_tokens, input_ids.shape[0]
        sink = embed(torch.full((batch, 1), self.sink_token_id, dtype=torch.long, device=input_ids.device))
        prompts = self.input_prompts.to(sink.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([sink, prompts, embed(input_ids)], dim=1)

    def key_bias(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, S) additive bias per key, causality aside: the text's right padding masked out."""
        return key_bias(attention_mask, self.num_prompts)

    def run_layers(self, hidden, bias, start: int, stop: int, scale: torch.Tensor | None = None,
                   prefix: LowerPrefix | None = None) -> torch.Tensor:
        """Decoder layers start..stop-1, called one by one (transformers' own layers, compiled when
        `self.compile_layers`: `compiled.py`), attending causally plus `bias`; `hidden` follows the
        `prefix`'s positions when given, and attends to its keys and values too."""
        before = 0 if prefix is None else prefix.states.shape[0]
        positions = torch.arange(before, before + hidden.shape[1], device=hidden.device).unsqueeze(0)
        rotary = self.base.model.rotary_emb(hidden, positions)
        attention = layer_inputs(bias, hidden.dtype, compiled=compiled.active(self.compile_layers), queries=hidden.shape[1])

        def through(call_layer) -> torch.Tensor:
            out = hidden
            for i in range(start, stop):
                if scale is not None:
                    out = out * scale
                extra = {} if prefix is None else {"prefix": (prefix.keys[i], prefix.values[i])}
                out = call_layer(self.base.model.layers[i], out, {**attention, **extra}, rotary, positions)
            return out

        return compiled.run(through, self.compile_layers)

    @torch.no_grad()
    def lower_prefix(self) -> LowerPrefix:
        """The sink and P1 through the lower layers, computed once per P1 (eager: it is one short sequence)."""
        p1 = self.input_prompts
        version = (p1.data_ptr(), p1._version, self.dtype, self.device)
        if self._lower_prefix is None or self._lower_prefix[0] != version:
            empty = torch.zeros((1, 0), dtype=torch.long, device=self.device)
            hidden, bias = self.embed(empty), self.key_bias(empty)
            positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
            rotary = self.base.model.rotary_emb(hidden, positions)
            kv = DynamicCache()  # each layer's attention leaves its rotated keys and values here
            for layer in self.base.model.layers[: self.inject_layer]:
                hidden = layer(hidden, **layer_inputs(bias, hidden.dtype), position_embeddings=rotary,
                               position_ids=positions, past_key_values=kv)
            kept = kv.layers[: self.inject_layer]
            self._lower_prefix = (version, LowerPrefix(hidden[0], [k.keys for k in kept], [k.values for k in kept]))
        return self._lower_prefix[1]

    @torch.no_grad()
    def entering(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, S, d) hidden states entering `inject_layer`: all frozen, so a cache may keep them.
        The lower layers run the text alone, after the sink's and P1's states (`lower_prefix`)."""
        prefix = self.lower_prefix()
        hidden = prefix.states.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
        if input_ids.shape[1] == 0:
            return hidden.clone()  # a caller may write into what it gets; the kept prefix stays as computed
        text = self.run_layers(self.base.model.embed_tokens(input_ids), self.key_bias(attention_mask), 0, self.inject_layer, prefix=prefix)
        return torch.cat([hidden, text], dim=1)

    def gate_input(self, hidden: torch.Tensor, question_mask: torch.Tensor) -> torch.Tensor:
        """(B, d) float32, never the sink or the response: the question's mean ('question'; the prompts'
        states are the same for every input), the paper's mean over 'prompts+question', or its 'last' token."""
        batch, k = hidden.shape[0], self.num_prompts
        question = question_mask.to(hidden.device, torch.float32)
        if self.cfg.gate_input == "last":
            positions = torch.arange(question.shape[1], device=hidden.device, dtype=torch.float32)
            last = (question * (positions + 1)).argmax(1)  # the last question position (0 when there is none)
            return hidden[torch.arange(batch, device=hidden.device), 1 + k + last].float()
        prompts = torch.full((batch, k), 1.0 if self.cfg.gate_input == "prompts+question" else 0.0, device=hidden.device)
        read = torch.cat([torch.zeros(batch, 1, device=hidden.device), prompts, question], dim=1)
        return (hidden.float() * read.unsqueeze(-1)).sum(1) / read.sum(1, keepdim=True).clamp_min(1.0)

    def splice(self, hidden: torch.Tensor) -> torch.Tensor:
        """The K prompt positions of `hidden` replaced by the trainable prompts."""
        k = self.num_prompts
        prompts = self.prompts.reshape(1, k, self.width).to(hidden.dtype).expand(hidden.shape[0], -1, -1)
        return torch.cat([hidden[:, :1], prompts, hidden[:, 1 + k :]], dim=1)

    def _per_prompt(self, per_expert: torch.Tensor, length: int, value: float) -> torch.Tensor:
        """(B, E) -> (B, length): each expert's value on its prompts' positions, `value` elsewhere."""
        spread = per_expert.repeat_interleave(self.prompts_per_expert, dim=1)
        return F.pad(spread, (1, length - 1 - self.num_prompts), value=value)

    def gate_bias(self, log_g: torch.Tensor, length: int) -> torch.Tensor:
        """(B, 1, 1, length) additive bias on attention logits: log(gain g_e) on expert e's prompt keys."""
        return self._per_prompt(log_g + math.log(self.gate.gain), length, 0.0).view(log_g.shape[0], 1, 1, length)

    def prompt_scale(self, g: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length, 1) multiplier of the literal 'hidden' mode: gain g_e on expert e's prompts, 1 elsewhere."""
        return self._per_prompt(g * self.gate.gain, length, 1.0).unsqueeze(-1)

    def _head(self, hidden, labels, want_logits: bool):
        """Loss from logits at the labelled positions only (the vocabulary is large); all if asked."""
        text, batch = hidden[:, self.num_prompts :], hidden.shape[0]  # position p predicts token p + 1
        logits = self.base.lm_head(self.base.model.norm(text)).float() if want_logits else None
        if labels is None:
            zeros = torch.zeros(batch, device=hidden.device)
            return None, zeros, zeros, logits
        labelled = labels != IGNORE_INDEX
        picked = logits[:, :-1][labelled] if want_logits else self.base.lm_head(self.base.model.norm(text[:, :-1][labelled]))
        token_nll = compiled.loss(picked, labels[labelled], self.compile_layers)
        nll = torch.zeros(batch, device=hidden.device, dtype=token_nll.dtype).index_add(0, labelled.nonzero()[:, 0], token_nll)
        loss = token_nll.mean() if token_nll.numel() else token_nll.sum()
        return loss, nll, labelled.sum(1), logits

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask, question_mask, labels=None, task_ids=None, *, entering: torch.Tensor | None = None,
                inject: bool = True, return_logits: bool = False) -> MoPsOutput:
        """A right-padded batch (`data.collate`) through MoPs. `entering`: the states entering `inject_layer`,
        when the caller has them (the activation cache); `inject=False`: P1's prompt tuning, every layer.
        `task_ids` come with the batch and are not used here: the gate routes without them."""
        length = 1 + self.num_prompts + input_ids.shape[1]
        bias = self.key_bias(attention_mask)
        if not inject:
            hidden = self.run_layers(self.embed(input_ids), bias, 0, self.num_layers)
            loss, nll, tokens, logits = self._head(hidden, labels, return_logits)
            return MoPsOutput(loss, nll, tokens, None, None, logits)

        if entering is None:  # the frozen lower layers, without autograd
            entering = self.entering(input_ids, attention_mask)
        gate = gate_logits = scale = None
        if self.gate is not None:  # scores from the question's states entering inject_layer
            gate_logits = self.gate.logits(self.gate_input(entering, question_mask))
            log_g = self.gate.log_scores(gate_logits)
            gate = log_g.exp()
        hidden = self.splice(entering)  # the trainable prompts replace P1's states
        if self.gating == "attention":  # attention to expert e's prompts x gain g_e, at every later layer
            bias = bias + self.gate_bias(log_g, length)
        elif self.gating == "hidden":
            scale = self.prompt_scale(gate, length).to(hidden.dtype)
        hidden = self.run_layers(hidden, bias, self.inject_layer, self.num_layers, scale)
        loss, nll, tokens, logits = self._head(hidden, labels, return_logits)
        return MoPsOutput(loss, nll, tokens, gate, gate_logits, logits)
