"""LoRA and IA3 through PEFT: the paper's Table 4 baselines, trained and scored like MoPs.

The adapter sits in the frozen (compressed) base as PEFT puts it; the wrapper below only
makes the model speak the interface `train.train_steps` and `evaluate.evaluate` use (a
right-padded batch in, summed NLL per sample out), so the baselines see the same samples in
the same order, the same sink token first, and the same response-token perplexity. Like
`MoPsModel`, it computes logits only where labels are.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from . import atomic, report
from .compression.pipeline import prepare_base
from .config import Settings
from .data import Formatter, pad_token_id, prepare
from .labels import IGNORE_INDEX
from .evaluate import evaluate
from .loading import base_fingerprint
from .metrics import first_per_task, score_answers
from .model import MoPsOutput
from .train import make_optimizer, train_steps

log = logging.getLogger(__name__)

PeftKind = Literal["lora", "ia3"]
PEFT_KINDS: tuple[str, ...] = ("lora", "ia3")


def peft_config(kind: str):
    """What a user of PEFT gets by default for a LLaMA model (LoRA r=8 on q/v; IA3 on k, v, down)."""
    from peft import IA3Config, LoraConfig, TaskType

    if kind == "lora":
        return LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    if kind == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM)
    raise ValueError(f"unknown PEFT baseline '{kind}' (choose from {', '.join(PEFT_KINDS)})")


def adapted(base: PreTrainedModel, config):
    """PEFT's `get_peft_model`, without the FutureWarning it triggers in transformers 5 by reading the
    deprecated `is_gradient_checkpointing` (PEFT's call, nothing a user can change)."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(base, config)


class PeftBaseline(nn.Module):
    """A PEFT-adapted base that answers like `MoPsModel` (no gate, no prompts)."""

    experts = 0
    gating = "none"

    def __init__(self, base: PreTrainedModel, kind: str, sink_token_id: int):
        super().__init__()
        self.kind = kind
        self.sink_token_id = int(sink_token_id)
        self.peft = adapted(base.requires_grad_(False), peft_config(kind))

    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft.parameters() if p.requires_grad]

    def forward(self, input_ids, attention_mask, question_mask=None, labels=None, **_) -> MoPsOutput:
        batch = input_ids.shape[0]
        sink = torch.full((batch, 1), self.sink_token_id, dtype=input_ids.dtype, device=input_ids.device)
        ids = torch.cat([sink, input_ids], dim=1)
        mask = torch.cat([torch.ones_like(sink), attention_mask], dim=1)
        inner = self.peft.get_base_model()
        hidden = inner.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]  # position p predicts text token p
        zeros = torch.zeros(batch, device=ids.device)
        if labels is None:
            return MoPsOutput(None, zeros, zeros.long(), None, None)
        labelled = labels != IGNORE_INDEX
        logits = inner.lm_head(hidden[labelled]).float()
        token_nll = F.cross_entropy(logits, labels[labelled], reduction="none")
        nll = torch.zeros(batch, device=ids.device, dtype=token_nll.dtype).index_add(0, labelled.nonzero()[:, 0], token_nll)
        loss = token_nll.mean() if token_nll.numel() else token_nll.sum()
        return MoPsOutput(loss, nll, labelled.sum(1), None, None)


    @torch.no_grad()
    def answer_many(self, formatter: Formatter, questions: list[tuple[str, str]], *, max_new_tokens: int, batch_size: int,
                    eos_id: int, pad_id: int, progress: bool = False) -> list[str]:
        """Greedy answers, `batch_size` at a time: [sink, question] left-padded, as any causal LM generates."""
        answers = []
        for start in range(0, len(questions), batch_size):
            ids = [[self.sink_token_id] + formatter.question_ids(i, c) for i, c in questions[start : start + batch_size]]
            width = max(map(len, ids))
            batch = torch.tensor([[pad_id] * (width - len(q)) + q for q in ids], device=self.device)
            mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in ids], device=self.device)
            out = self.peft.generate(input_ids=batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos_id, pad_token_id=pad_id, top_k=None)
            for tokens in out[:, width:].tolist():
                tokens = tokens[: tokens.index(eos_id)] if eos_id in tokens else tokens
                answers.append(formatter.tokenizer.decode(tokens, skip_special_tokens=True))
        return answers


def run(settings: Settings, kind: str, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train a PEFT baseline centrally with MoPs' data, steps and learning rate; write results.json."""
    from .centralized import sink_token_id

    out_dir = Path(out_dir)
    started = time.perf_counter()
    base, tokenizer = prepare_base(settings, progress=progress)
    data = prepare(settings.data, tokenizer)
    pad_id = pad_token_id(tokenizer)
    torch.manual_seed(settings.train.seed)
    model = PeftBaseline(copy.deepcopy(base), kind, sink_token_id(tokenizer))
    trainable = sum(p.numel() for p in model.trainable_parameters())
    score = dict(
        tasks=data.tasks, pad_id=pad_id, batch_size=settings.train.eval_batch_size,
        max_samples=settings.train.eval_samples, progress=progress,
    )
    before = evaluate(model, data.test, desc=f"{kind} eval (start)", **score)
    optimizer = make_optimizer(model.trainable_parameters(), settings.train.lr)
    train_started = time.perf_counter()
    stats = train_steps(
        model, data.train, settings.train.steps, optimizer, pad_id=pad_id, batch_size=settings.train.batch_size,
        seed=settings.train.seed, desc=f"{kind} training", progress=progress,
    )
    train_seconds = time.perf_counter() - train_started
    after = evaluate(model, data.test, desc=f"{kind} eval (end)", **score)
    generation = None
    if settings.train.generation_samples:
        chosen = first_per_task(data.test_records, data.tasks, settings.train.generation_samples)
        texts = model.answer_many(
            Formatter(tokenizer, settings.data.max_length, data.tasks), [(r.instruction, r.context) for r in chosen],
            max_new_tokens=settings.train.max_new_tokens, batch_size=settings.train.eval_batch_size,
            eos_id=tokenizer.eos_token_id, pad_id=pad_id,
        )
        generation = score_answers(texts, chosen, data.tasks, settings.train.max_new_tokens)
    results = {
        "settings": settings.to_flat(),
        "method": kind,
        "tasks": list(data.tasks),
        "base_fingerprint": base_fingerprint(base),
        "trainable_parameters": trainable,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "generation": generation.to_dict() if generation else None,
        "train": {"steps": stats.steps, "mean_loss": stats.mean_loss, "seconds": train_seconds, "losses": stats.losses},
        "wall_seconds": time.perf_counter() - started,
    }
    atomic.write_json(out_dir / "results.json", results)
    report.print_eval(after, title=f"{kind}: test perplexity", before=before)
    return results
