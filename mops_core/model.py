"""Mixture of Prompts (Dun et al., Algorithm 1) over a frozen LLaMA-family causal LM.

Sequence layout, left to right:

    [sink] [P_1 .. P_K] [question tokens] [response tokens] [padding]

* `sink` is the model's BOS token. LLaMA models park attention on their first position; it
  stays first and is never gated (NOTES.md, "keep the attention sink out of the mixture").
* Layers `0 .. inject_layer-1` run on the frozen input prompts P1 under `torch.no_grad`:
  nothing below the injection point is back-propagated.
* Entering layer `inject_layer`, the gate reads the mean hidden state over the prompts and
  the question (never the response: it does not exist at inference), and the K prompt
  positions are overwritten by the K trainable prompts, E experts of K/E prompts each.
* From there on, with `gating="attention"`, the attention logit of every query towards a key
  of expert e's prompts gets `+ log g_e`, i.e. its unnormalised attention weight is multiplied
  by `g_e`. It rides in the additive 4D mask handed to transformers' own decoder layers.
  `gating="hidden"` is the paper's literal product on the prompts' hidden states (an
  ablation: under pre-norm it barely reaches attention); `gating="none"` is the baseline.

Because prompts precede the text in a causal model, the hidden states at the prompt positions
do not depend on the input. `init_prompts_from_input` copies them into the trainable prompts,
so training starts exactly from the input-prompt-tuned model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .config import MoPsConfig
from .data import IGNORE_INDEX

# Names of the tensors that belong to MoPs, identical in the model, the checkpoint and the
# federated messages. The input prompts are frozen after pretraining and never travel.
INPUT_PROMPTS = "input_prompts"
PROMPTS = "prompts"
GATE_PREFIX = "gate."


def is_federated_key(name: str) -> bool:
    """What the server sends and averages each round: the experts and the gate.

    The gate's input statistics ('standardise') ride along: fixed after pretraining, they are
    the same in every reply and average to themselves, and a client needs nothing but the
    message to use them.
    """
    return name == PROMPTS or name.startswith(GATE_PREFIX)


class Gate(nn.Module):
    """g = softmax(W2 relu(W1 norm(x))); returns the logits, callers take (log-)softmax.

    `norm` is what the gate does to its input first. LLM hidden states carry a few dimensions
    hundreds of times larger than the rest, and the task signal sits in the small ones: 'rms'
    scales the whole vector to unit RMS (the huge dimensions still dominate), 'none' feeds it
    raw, 'standardise' takes every dimension to zero mean and unit variance over the
    gate-pretraining instructions (held-out routing on Dolly: 0.45 with rms, 0.62 standardised;
    README, "Making the mixture pay"). Its statistics are buffers: they travel with the gate
    (checkpoints, start states, federated messages) but are never trained.
    """

    def __init__(self, width: int, hidden: int, experts: int, norm: str = "rms"):
        super().__init__()
        self.norm = norm
        if norm == "standardise":  # identity until `fit_input_statistics`
            self.register_buffer("input_mean", torch.zeros(width))
            self.register_buffer("input_scale", torch.ones(width))
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, experts)
        # Zero output layer: every expert starts with the same score, 1/E.
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    @torch.no_grad()
    def fit_input_statistics(self, feats: torch.Tensor) -> None:
        """Take the per-dimension mean and scale of 'standardise' from these gate inputs (N, d)."""
        if self.norm != "standardise":
            return
        if feats.shape[0] < 2 or not torch.isfinite(feats).all():
            raise ValueError(f"standardising the gate's input needs at least 2 finite inputs, got {feats.shape[0]}")
        mean, std = feats.float().mean(0), feats.float().std(0)
        self.input_mean.copy_(mean)
        # A dimension that (nearly) never varies is not blown up from its rounding noise.
        self.input_scale.copy_(torch.maximum(std, 1e-6 * mean.abs() + 1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "rms":
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif self.norm == "standardise":
            x = (x - self.input_mean) / self.input_scale
        return self.fc2(F.relu(self.fc1(x)))


@dataclass
class LowerState:
    """What the frozen layers below the injection point produce for a batch."""

    hidden: torch.Tensor  # (B, S, d) entering layer `inject_layer`
    mask: torch.Tensor  # (B, 1, S, S) additive causal + padding mask
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    gate_input: torch.Tensor  # (B, d) float32, what the gate reads (see `lower_state`)


@dataclass
class MoPsOutput:
    loss: torch.Tensor | None  # mean NLL over the batch's labelled tokens
    nll: torch.Tensor  # (B,) summed NLL of each sample's labelled tokens
    tokens: torch.Tensor  # (B,) labelled tokens of each sample
    gate: torch.Tensor | None  # (B, E) expert scores, None without gating
    gate_logits: torch.Tensor | None
    logits: torch.Tensor | None = None  # (B, T, V), when asked: logits[:, j] predicts text token j
    next_logits: torch.Tensor | None = None  # (B, V), when asked: the token after each sample's last one


class MoPsModel(nn.Module):
    def __init__(self, base: PreTrainedModel, cfg: MoPsConfig, sink_token_id: int):
        super().__init__()
        self.base = base.requires_grad_(False).eval()
        self.cfg = cfg
        config = base.config
        self.width = config.hidden_size
        self.num_layers = config.num_hidden_layers
        self.inject_layer = cfg.resolve_inject_layer(self.num_layers)
        self.gating = cfg.effective_gating
        self.experts = cfg.experts
        self.prompts_per_expert = cfg.prompts_per_expert
        self.num_prompts = cfg.num_prompts
        self.sink_token_id = int(sink_token_id)
        self.input_prompts = nn.Parameter(torch.zeros(self.num_prompts, self.width), requires_grad=False)
        self.prompts = nn.Parameter(torch.zeros(cfg.experts, cfg.prompts_per_expert, self.width))
        self.gate = Gate(self.width, cfg.gate_hidden, cfg.experts, cfg.gate_input_norm) if self.gating != "none" else None
        self.activation_cache = None  # an activations.ActivationCache, attached by whoever trains

    # ------------------------------------------------------------------ state

    @property
    def device(self) -> torch.device:
        return self.input_prompts.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.model.embed_tokens.weight.dtype

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor MoPs adds to the base, parameters and buffers, live (what loads copy into)."""
        named = itertools.chain(self.named_parameters(), self.named_buffers())
        return {name: t for name, t in named if not name.startswith("base.")}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor MoPs adds to the base (what a checkpoint stores)."""
        return {name: t.detach() for name, t in self.adapter_tensors().items()}

    def federated_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.adapter_state_dict().items() if is_federated_key(k)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if is_federated_key(name)]

    # ------------------------------------------------------------------ initialisation

    @torch.no_grad()
    def init_input_prompts(self, generator: torch.Generator | None = None, token_ids: Sequence[int] | None = None) -> None:
        """Input prompts start as token embeddings, so that they begin where the model expects inputs.

        Random vocabulary tokens by default (PEFT's SAMPLE_VOCAB); with `token_ids`, those tokens
        repeated to fill the K positions (PEFT's TEXT init): a coherent text disturbs a small,
        pruned model less than 70 random words do.
        """
        vocab = self.base.model.embed_tokens.weight
        if token_ids is None:
            ids = torch.randint(0, vocab.shape[0], (self.num_prompts,), generator=generator)
        else:
            if not token_ids:
                raise ValueError("the input prompts' init text has no tokens")
            repeats = -(-self.num_prompts // len(token_ids))
            ids = torch.tensor((list(token_ids) * repeats)[: self.num_prompts], dtype=torch.long)
        self.input_prompts.copy_(vocab[ids.to(vocab.device)].float())

    @torch.no_grad()
    def prompt_states_entering_injection(self) -> torch.Tensor:
        """Hidden states of the K prompt positions entering `inject_layer` (input-independent)."""
        empty = torch.zeros((1, 0), dtype=torch.long, device=self.device)
        state = self.lower(empty, empty, empty.bool(), layers=self.inject_layer)
        return state.hidden[0, 1 : 1 + self.num_prompts].float()

    @torch.no_grad()
    def init_prompts_from_input(self) -> None:
        """Start the trainable prompts where the frozen input prompts already are at `inject_layer`."""
        self.prompts.copy_(self.prompt_states_entering_injection().view_as(self.prompts))

    # ------------------------------------------------------------------ forward pieces

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        embed = self.base.model.embed_tokens
        batch = input_ids.shape[0]
        sink = embed(torch.full((batch, 1), self.sink_token_id, dtype=torch.long, device=input_ids.device))
        prompts = self.input_prompts.to(sink.dtype).unsqueeze(0).expand(batch, -1, -1)
        return torch.cat([sink, prompts, embed(input_ids)], dim=1)

    def _mask(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        batch, text = attention_mask.shape
        length = 1 + self.num_prompts + text
        device = attention_mask.device
        keys_ok = torch.cat([torch.ones(batch, 1 + self.num_prompts, dtype=torch.bool, device=device), attention_mask.bool()], 1)
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        allowed = causal.unsqueeze(0) & keys_ok.unsqueeze(1)
        mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=device)
        return mask.masked_fill(~allowed.unsqueeze(1), torch.finfo(dtype).min)

    def _run(self, hidden, layers, mask, position_embeddings, position_ids, scale=None):
        for layer in layers:
            if scale is not None:
                hidden = hidden * scale
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, position_ids=position_ids)
        return hidden

    def lower(self, input_ids, attention_mask, question_mask, *, layers: int | None = None) -> LowerState:
        """Sink + input prompts + text through the frozen layers below the injection point.

        With an `activation_cache` attached (and no `layers` override), states already computed
        for these samples are reused instead (see activations.py).
        """
        if layers is None and self.activation_cache is not None:
            return self.activation_cache.lower(self, input_ids, attention_mask, question_mask)
        hidden = self._embed(input_ids)
        length = hidden.shape[1]
        mask = self._mask(attention_mask, hidden.dtype)
        position_ids = torch.arange(length, device=hidden.device).unsqueeze(0)
        position_embeddings = self.base.model.rotary_emb(hidden, position_ids)
        stop = self.inject_layer if layers is None else layers
        hidden = self._run(hidden, self.base.model.layers[:stop], mask, position_embeddings, position_ids)
        return self.lower_state(hidden, mask, position_embeddings, question_mask)

    def lower_state(self, hidden, mask, position_embeddings, question_mask) -> LowerState:
        """Wrap the hidden states entering `inject_layer`, with the gate's input read from them.

        The gate never reads the sink or the response. `gate-input` chooses among the paper's
        average over prompts and question, the question's average alone (the prompts' states
        are the same for every sample and dilute it), and the question's last token.
        """
        batch, k = hidden.shape[0], self.num_prompts
        question = question_mask.to(hidden.device, torch.float32)
        if self.cfg.gate_input == "last":
            positions = torch.arange(question.shape[1], device=hidden.device, dtype=torch.float32)
            last = (question * (positions + 1)).argmax(1)  # the last question position (0 when there is none)
            gate_input = hidden[torch.arange(batch, device=hidden.device), 1 + k + last].float()
            return LowerState(hidden, mask, position_embeddings, gate_input)
        prompts = torch.full((batch, k), 1.0 if self.cfg.gate_input == "prompts+question" else 0.0, device=hidden.device)
        read = torch.cat([torch.zeros(batch, 1, device=hidden.device), prompts, question], dim=1)
        gate_input = (hidden.float() * read.unsqueeze(-1)).sum(1) / read.sum(1, keepdim=True).clamp_min(1.0)
        return LowerState(hidden, mask, position_embeddings, gate_input)

    def gate_logits(self, gate_input: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            raise RuntimeError("this model has no gate (gating = 'none')")
        return self.gate(gate_input)

    def gate_log_probs(self, gate_logits: torch.Tensor) -> torch.Tensor:
        """log g: temperature, router noise (only while gradients flow, i.e. training) and a floor per expert."""
        cfg = self.cfg
        logits = gate_logits / cfg.gate_temperature
        if cfg.gate_noise > 0 and torch.is_grad_enabled():
            logits = logits + cfg.gate_noise * torch.randn_like(logits)
        log_gate = F.log_softmax(logits, dim=-1)
        if cfg.gate_floor > 0:
            log_gate = torch.log(cfg.gate_floor + (1.0 - self.experts * cfg.gate_floor) * log_gate.exp())
        return log_gate

    def gate_scores(self, gate_input: torch.Tensor) -> torch.Tensor:
        """g for a batch of gate inputs, as the upper layers use it."""
        return self.gate_log_probs(self.gate_logits(gate_input)).exp()

    def per_prompt(self, per_expert: torch.Tensor) -> torch.Tensor:
        """(B, E) -> (B, K): each expert's value repeated over its prompts."""
        return per_expert.repeat_interleave(self.prompts_per_expert, dim=1)

    @property
    def gate_gain(self) -> float:
        """What multiplies g before it weighs the prompts: 1 (the paper), or E, so that a uniform
        gate weighs every prompt 1, exactly as the ungated baseline does, and the gate only shifts
        weight between experts instead of also turning all of them down by 1/E."""
        return float(self.experts) if self.cfg.gate_scale == "experts" else 1.0

    def key_bias(self, log_gate: torch.Tensor, length: int) -> torch.Tensor:
        """(B, 1, 1, S) additive bias on attention logits: log(gain g_e) on expert e's prompt keys.

        Zero on the sink and the text, so only attention *to the prompts* is re-weighted.
        """
        bias = F.pad(self.per_prompt(log_gate + math.log(self.gate_gain)), (1, length - 1 - self.num_prompts))
        return bias.view(log_gate.shape[0], 1, 1, length)

    def prompt_scale(self, gate: torch.Tensor, length: int) -> torch.Tensor:
        """(B, S, 1) multiplier for the literal 'hidden' mode: gain g_e on expert e's prompts, 1 elsewhere."""
        return F.pad(self.per_prompt(gate * self.gate_gain), (1, length - 1 - self.num_prompts), value=1.0).unsqueeze(-1)

    def _final(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.base.lm_head(self.base.model.norm(hidden)).float()

    def next_token_logits(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, V): what comes after each sample's last real token (right padding)."""
        last = 1 + self.num_prompts + attention_mask.sum(1) - 1
        return self._final(hidden[torch.arange(hidden.shape[0], device=hidden.device), last])

    def _head(self, hidden: torch.Tensor, labels: torch.Tensor | None, want_logits: bool):
        """Logits only where labels are, unless all logits are asked for."""
        text = hidden[:, self.num_prompts : hidden.shape[1] - 1]  # position p predicts token p + 1
        batch = hidden.shape[0]
        logits = self._final(text) if want_logits else None
        if labels is None:
            zeros = torch.zeros(batch, device=hidden.device)
            return None, zeros, zeros, logits
        labelled = labels != IGNORE_INDEX
        targets = labels[labelled]
        picked = logits[labelled] if logits is not None else self._final(text[labelled])
        token_nll = F.cross_entropy(picked, targets, reduction="none")
        rows = labelled.nonzero()[:, 0]
        nll = torch.zeros(batch, device=hidden.device, dtype=token_nll.dtype).index_add(0, rows, token_nll)
        tokens = labelled.sum(1)
        loss = token_nll.mean() if token_nll.numel() else token_nll.sum()
        return loss, nll, tokens, logits

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        question_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        inject: bool = True,
        return_logits: bool = False,
        **_: torch.Tensor,
    ) -> MoPsOutput:
        """Run a right-padded batch (see `data.collate`); `inject=False` is plain prompt tuning."""
        if not inject:
            state = self.lower(input_ids, attention_mask, question_mask, layers=self.num_layers)
            loss, nll, tokens, logits = self._head(state.hidden, labels, return_logits)
            following = self.next_token_logits(state.hidden, attention_mask) if return_logits else None
            return MoPsOutput(loss, nll, tokens, None, None, logits, following)

        with torch.no_grad():
            state = self.lower(input_ids, attention_mask, question_mask)
        return self.upper(state, labels, return_logits=return_logits, attention_mask=attention_mask)

    def upper(
        self,
        state: LowerState,
        labels: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
        attention_mask: torch.Tensor | None = None,
    ) -> MoPsOutput:
        """Inject the trainable prompts and run the layers from `inject_layer` on."""
        hidden = state.hidden
        batch, length, _ = hidden.shape
        k = self.num_prompts
        prompts = self.prompts.reshape(1, k, self.width).to(hidden.dtype).expand(batch, -1, -1)
        hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1 + k :]], dim=1)

        mask, scale, gate, gate_logits = state.mask, None, None, None
        if self.gating != "none":
            gate_logits = self.gate_logits(state.gate_input)
            log_gate = self.gate_log_probs(gate_logits)
            gate = log_gate.exp()
            if self.gating == "attention":
                mask = mask + self.key_bias(log_gate, length).to(mask.dtype)
            else:  # "hidden": the paper's literal Hadamard product at every later layer's input
                scale = self.prompt_scale(gate, length).to(hidden.dtype)

        position_ids = torch.arange(length, device=hidden.device).unsqueeze(0)
        layers = self.base.model.layers[self.inject_layer :]
        hidden = self._run(hidden, layers, mask, state.position_embeddings, position_ids, scale)
        loss, nll, tokens, logits = self._head(hidden, labels, return_logits)
        following = None
        if return_logits and attention_mask is not None:
            following = self.next_token_logits(hidden, attention_mask)
        return MoPsOutput(loss, nll, tokens, gate, gate_logits, logits, following)
