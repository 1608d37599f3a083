"""Answering with a tuned MoPs model: transformers' `generate`, its KV cache, and the mixture.

The gate is computed from the question exactly as in training. Generation then starts from the
input embeddings [sink, P1, question] and runs the base's own `generate`; forward pre-hooks on
the decoder layers give it MoPs' behaviour, through the model's own splice and gate bias:

* at `inject_layer`, during the prefill, the prompt positions are overwritten by the trained
  prompts (their keys and values then sit in the KV cache like a prefix);
* from `inject_layer` on, the attention mask gets `log g_e` on the keys of expert e's prompts
  (`gating="attention"`), for the prefill and for every decoded token alike;
* or, for `gating="hidden"`, the prompts' hidden states are scaled by g at each later layer.

Greedy decoding this way gives exactly the tokens that repeated full MoPs forward passes give
(tests/test_generate.py), with one cached step per new token instead of a full pass.

Many questions go in batches: each question is gated as in training (right padding, masked), and
generation pads between the input prompts and the question ([sink, P1, pad.., question]), so that
the prompts keep their positions for the splice and the gate bias and the question keeps its own
(transformers numbers positions by the attention mask).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Formatter, collate
from .model import MoPsModel


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each generated token under the model
    gate: list[float] | None  # expert scores of this question

    def top_experts(self, k: int = 3) -> list[tuple[int, float]]:
        if self.gate is None:
            return []
        return sorted(enumerate(self.gate), key=lambda e: -e[1])[:k]


def _past_length(kwargs: dict, layer_idx: int) -> int:
    cache = kwargs.get("past_key_values")
    return cache.get_seq_length(layer_idx) if cache is not None else 0


def _mask_for(kwargs: dict, hidden: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """The additive (B, 1, q, kv) mask this layer would use, as a float tensor."""
    past = _past_length(kwargs, layer_idx)
    batch, query = hidden.shape[:2]
    keys = past + query
    mask = kwargs.get("attention_mask")
    lowest = torch.finfo(hidden.dtype).min
    if mask is None:  # transformers leaves causality to sdpa's is_causal; we need it explicit
        allowed = torch.ones(query, keys, dtype=torch.bool, device=hidden.device).tril(diagonal=past)
        mask = torch.zeros(batch, 1, query, keys, dtype=hidden.dtype, device=hidden.device).masked_fill(~allowed, lowest)
    elif mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(~mask, lowest)
    return mask


@contextlib.contextmanager
def mixture_hooks(model: MoPsModel, log_g: torch.Tensor | None) -> Iterator[None]:
    """Give the base's layers MoPs' behaviour for one question (log_g: (1, E) log scores or None),
    with the model's own splice, gate bias and prompt scale."""
    k = model.num_prompts
    layers = model.base.model.layers
    handles = []

    def prefill(kwargs: dict, module, hidden: torch.Tensor) -> bool:  # the pass that holds the prompts
        return _past_length(kwargs, module.self_attn.layer_idx) == 0 and hidden.shape[1] > k

    def inject(module, args, kwargs):
        hidden = model.splice(args[0]) if prefill(kwargs, module, args[0]) else args[0]
        return (hidden, *args[1:]), kwargs

    def bias_prompt_keys(module, args, kwargs):
        mask = _mask_for(kwargs, args[0], module.self_attn.layer_idx)
        if mask.shape[-1] > k:
            mask = mask + model.gate_bias(log_g, mask.shape[-1]).to(mask.dtype)
        kwargs["attention_mask"] = mask
        return args, kwargs

    def scale_prompts(module, args, kwargs):
        hidden = args[0]
        if prefill(kwargs, module, hidden):
            hidden = hidden * model.prompt_scale(log_g.exp(), hidden.shape[1]).to(hidden.dtype)
        return (hidden, *args[1:]), kwargs

    try:
        handles.append(layers[model.inject_layer].register_forward_pre_hook(inject, with_kwargs=True))
        for layer in layers[model.inject_layer :]:
            if model.gating == "attention":
                handles.append(layer.register_forward_pre_hook(bias_prompt_keys, with_kwargs=True))
            elif model.gating == "hidden":
                handles.append(layer.register_forward_pre_hook(scale_prompts, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class Generator:
    """Questions in, answers out, with the compressed base and the tuned experts."""

    def __init__(self, model: MoPsModel, formatter: Formatter, eos_token_id: int, pad_token_id: int):
        self.model = model
        self.formatter = formatter
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    @torch.no_grad()
    def gate(self, question: torch.Tensor) -> torch.Tensor | None:
        """(1, E) log scores of the experts for this question, as in training."""
        if self.model.gate is None:
            return None
        ones = torch.ones_like(question)
        return self.model.gate(self.model.gate_input(self.model.entering(question, ones), ones.bool()))

    @torch.no_grad()
    def gate_many(self, questions: Sequence[list[int]]) -> torch.Tensor | None:
        """(B, E) log scores, each question gated as in training (right padding, masked)."""
        if self.model.gate is None:
            return None
        from .data import Example

        batch = collate([Example(tuple(q), len(q), -1) for q in questions], self.pad_token_id, with_response=False)
        ids, mask = batch["input_ids"].to(self.model.device), batch["attention_mask"].to(self.model.device)
        return self.model.gate(self.model.gate_input(self.model.entering(ids, mask), mask.bool()))

    @torch.no_grad()
    def answer_many(self, questions: Sequence[tuple[str, str]], *, max_new_tokens: int = 128, batch_size: int = 8,
                    progress: bool = False) -> list[Answer]:
        """Greedy answers to (instruction, context) pairs, `batch_size` at a time."""
        from tqdm.auto import tqdm

        model, answers = self.model, []
        starts = range(0, len(questions), batch_size)
        for start in tqdm(starts, desc="generate", disable=not progress, leave=False):
            ids = [self.formatter.question_ids(i, c) for i, c in questions[start : start + batch_size]]
            log_g = self.gate_many(ids)
            width = max(len(q) for q in ids)
            padded = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
            text_mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, q in enumerate(ids):
                padded[row, width - len(q) :] = torch.tensor(q)
                text_mask[row, width - len(q) :] = 1
            embeds = model.embed(padded.to(model.device))
            mask = torch.cat([torch.ones(len(ids), 1 + model.num_prompts, dtype=torch.long), text_mask], 1).to(model.device)
            with mixture_hooks(model, log_g):
                out = model.base.generate(
                    inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                    eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, use_cache=True, top_k=None,
                    return_dict_in_generate=True,
                )
            for row, tokens in enumerate(out.sequences.tolist()):
                if self.eos_token_id in tokens:
                    tokens = tokens[: tokens.index(self.eos_token_id)]
                text = self.formatter.tokenizer.decode(tokens, skip_special_tokens=True)
                answers.append(Answer(text, tokens, [], None if log_g is None else log_g[row].exp().tolist()))
        return answers

    @torch.no_grad()
    def answer(
        self,
        instruction: str,
        context: str = "",
        *,
        max_new_tokens: int = 128,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        min_new_tokens: int = 0,
    ) -> Answer:
        model = self.model
        ids = self.formatter.question_ids(instruction, context)
        question = torch.tensor([ids], device=model.device)
        log_g = self.gate(question)
        embeds = model.embed(question)
        sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        with mixture_hooks(model, log_g):
            out = model.base.generate(
                inputs_embeds=embeds,
                attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=model.device),
                max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.pad_token_id,
                use_cache=True,
                top_k=None,
                output_logits=True,
                return_dict_in_generate=True,
                **sampling,
            )
        new = out.sequences[0].tolist()
        logprobs = [F.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, new)]
        if new and new[-1] == self.eos_token_id:
            new, logprobs = new[:-1], logprobs[:-1]
        text = self.formatter.tokenizer.decode(new, skip_special_tokens=True)
        return Answer(text, new, logprobs, None if log_g is None else log_g[0].exp().tolist())
