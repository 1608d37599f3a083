"""Training: the one step loop, and the two pretraining stages that precede it.

1. Input prompts P1: plain prompt tuning for a few steps (paper: 20), full back-propagation,
   no gate, no injection. Then frozen; the trainable prompts start from their state at
   `inject_layer` (see `MoPsModel.init_prompts_from_input`).
2. Gate: instructions only, with task labels, expert i <-> task i, cross-entropy on g. The
   gate's input comes from the frozen lower layers only, so it is computed once per sample
   and the MLP trains on the cached features.
3. MoPs (or baseline) steps: `train_steps`, shared by centralized training and each
   federated client's local round.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .activations import ActivationCache, entering
from .config import TrainConfig
from .data import Example, collate
from .labels import expert_targets
from .model import MoPsModel


class TrainingError(RuntimeError):
    """Training diverged (NaN/inf loss) or was asked something impossible."""


@dataclass
class StepStats:
    steps: int = 0
    examples: int = 0
    losses: list[float] = field(default_factory=list)
    gate_sum: torch.Tensor | None = None  # summed expert scores over the examples seen

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan

    @property
    def mean_gate(self) -> list[float] | None:
        if self.gate_sum is None or not self.examples:
            return None
        return (self.gate_sum / self.examples).tolist()


def epochs(examples: Sequence[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Endless shuffled passes over the examples, `batch_size` at a time."""
    if not examples:
        raise TrainingError("no training examples")
    order = list(range(len(examples)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if len(chunk) < batch_size and len(order) >= batch_size:
                chunk += order[: batch_size - len(chunk)]
            yield [examples[i] for i in chunk]


def round_seed(seed: int, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible sample order for each client and round (a resumed run replays it)."""
    return (seed * 1_000_003 + server_round) * 1_000_003 + partition_id


def make_optimizer(params: Sequence[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay: it would pull prompts, which live at hidden-state scale, towards zero."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=0.0)


@torch.no_grad()
def prompt_learning_rate(model: MoPsModel, cfg: TrainConfig) -> float:
    """`prompt-lr`, or lr x the RMS of the prompts' starting hidden states when it is 0.

    Injected prompts live at hidden-state scale (an RMS of several units in a middle layer, where
    input embeddings are hundredths), and Adam's step is about lr per element whatever the scale:
    at one shared lr they would barely move. The RMS comes from the frozen input prompts, so
    every client derives the same rate.
    """
    if cfg.prompt_lr > 0 or model.num_prompts == 0:
        return cfg.prompt_lr or cfg.lr
    return cfg.lr * model.prompt_states().float().pow(2).mean().sqrt().item()


def make_mops_optimizer(model: MoPsModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the experts (at the prompt learning rate) and the gate (at lr x gate-lr-scale).

    A gate at scale 0 is left out of the optimizer altogether, so that it keeps its pretrained
    routing exactly (and clients send back the gate they received). No weight decay (see `make_optimizer`).
    """
    groups = [{"params": [model.prompts], "lr": prompt_learning_rate(model, cfg)}]
    if model.gate is not None and cfg.gate_lr_scale > 0:
        groups.append({"params": list(model.gate.parameters()), "lr": cfg.lr * cfg.gate_lr_scale})
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)


def make_personal_optimizer(model: MoPsModel, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over what adapts a shared model to one client's data (`personalize-steps`): the gate, at
    lr x gate-lr-scale (lr where the gate does not train in rounds); an ungated model's prompts."""
    if model.gate is None:
        return torch.optim.AdamW([model.prompts], lr=prompt_learning_rate(model, cfg), weight_decay=0.0)
    return torch.optim.AdamW(model.gate.parameters(), lr=cfg.lr * (cfg.gate_lr_scale or 1.0), weight_decay=0.0)


class GateRegulariser:
    """The load-balancing term of MoE routers: KL(running mean gate || uniform), weighted by `balance`,
    so that an expert nobody uses costs. The mean runs over recent steps (momentum), since a batch
    may hold a single sample.
    """

    def __init__(self, balance: float, momentum: float = 0.9):
        self.balance, self.momentum = balance, momentum
        self.running: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> GateRegulariser | None:
        return cls(cfg.gate_balance) if cfg.gate_balance else None

    def __call__(self, gate: torch.Tensor | None) -> torch.Tensor | None:
        if gate is None:
            return None
        mean = gate.mean(0)
        if self.running is not None:
            mean = self.momentum * self.running + (1.0 - self.momentum) * mean
        self.running = mean.detach()
        loss = gate.new_zeros(())
        return loss + self.balance * (mean * (mean.clamp_min(1e-12) * gate.shape[-1]).log()).sum()


def train_steps(
    model: MoPsModel,
    examples: Sequence[Example],
    steps: int,
    optimizer: torch.optim.Optimizer,
    *,
    pad_id: int,
    batch_size: int = 1,
    seed: int = 0,
    inject: bool = True,
    cache: ActivationCache | None = None,
    desc: str = "train",
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    regulariser: GateRegulariser | None = None,
) -> StepStats:
    """Run `steps` optimizer steps on batches drawn from `examples`; the loop every trainer shares.

    The recorded losses are the language-model loss alone, with or without a gate regulariser.
    `cache` supplies the states entering `inject_layer` (exact: everything below is frozen).
    """
    stats = StepStats()
    batches = epochs(examples, batch_size, random.Random(seed))
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        batch = {k: v.to(model.device) for k, v in collate(next(batches), pad_id).items()}
        states = entering(model, batch, cache) if inject and cache is not None else None
        out = model(**batch, entering=states, inject=inject)
        loss = out.loss
        if not torch.isfinite(loss):
            raise TrainingError(f"{desc}: loss became {loss.item()} at step {step + 1}; lower the learning rate")
        extra = regulariser(out.gate) if regulariser is not None else None
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()
        stats.steps += 1
        stats.examples += batch["input_ids"].shape[0]
        stats.losses.append(value)
        if out.gate is not None:
            summed = out.gate.detach().float().sum(0).cpu()
            stats.gate_sum = summed if stats.gate_sum is None else stats.gate_sum + summed
        if on_step is not None:
            on_step(step, value)
        recent = stats.losses[-20:]
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
    return stats


@torch.no_grad()
def init_input_prompts(model: MoPsModel, generator: torch.Generator | None = None, token_ids: Sequence[int] | None = None) -> None:
    """P1 starts as token embeddings, where the model expects inputs: random vocabulary tokens
    (PEFT's SAMPLE_VOCAB), or `token_ids` repeated over the K positions (PEFT's TEXT init)."""
    vocab = model.base.model.embed_tokens.weight
    if token_ids is None:
        ids = torch.randint(0, vocab.shape[0], (model.num_prompts,), generator=generator)
    else:
        if not token_ids:
            raise ValueError("the input prompts' init text has no tokens")
        repeats = -(-model.num_prompts // len(token_ids))
        ids = torch.tensor((list(token_ids) * repeats)[: model.num_prompts], dtype=torch.long)
    model.input_prompts.copy_(vocab[ids.to(vocab.device)].float())


def pretrain_input_prompts(
    model: MoPsModel, examples: Sequence[Example], cfg: TrainConfig, *, pad_id: int, progress: bool = True
) -> StepStats:
    """Stage 1: plain prompt tuning of P1 (all layers back-propagated), then freeze it."""
    stats = StepStats()
    if cfg.input_prompt_steps and model.num_prompts:
        model.input_prompts.requires_grad_(True)
        try:
            optimizer = make_optimizer([model.input_prompts], cfg.input_prompt_lr)
            stats = train_steps(
                model, examples, cfg.input_prompt_steps, optimizer, pad_id=pad_id, batch_size=cfg.batch_size,
                seed=cfg.seed, inject=False, desc="input prompts", progress=progress,
            )
        finally:
            model.input_prompts.requires_grad_(False)
    model.init_prompts_from_input()
    return stats


def question_batches(
    examples: Sequence[Example], *, pad_id: int, batch_size: int, progress: bool = False
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """The examples' instructions alone (no response), shortest first so that batches pad little.

    Yields each batch with the positions in `examples` its rows came from.
    """
    order = sorted(range(len(examples)), key=lambda i: examples[i].question_len)
    for start in tqdm(range(0, len(order), batch_size), desc="gate features", disable=not progress, leave=False):
        rows = order[start : start + batch_size]
        yield rows, collate([examples[i] for i in rows], pad_id, with_response=False)


@torch.no_grad()
def gate_features(
    model: MoPsModel, examples: Sequence[Example], *, pad_id: int, batch_size: int = 16, progress: bool = False,
    cache: ActivationCache | None = None,
) -> torch.Tensor:
    """The gate's input for each example's question, from the frozen layers below the injection point."""
    out = torch.empty(len(examples), model.width)
    for rows, batch in question_batches(examples, pad_id=pad_id, batch_size=batch_size, progress=progress):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        out[rows] = model.gate_input(entering(model, batch, cache), batch["question_mask"]).cpu()
    return out


def pretrain_gate(
    model: MoPsModel, examples: Sequence[Example], cfg: TrainConfig, *, pad_id: int, progress: bool = True,
    cache: ActivationCache | None = None,
) -> float | None:
    """Stage 2: teach the gate expert i <-> task i from instructions alone; returns train accuracy.

    A standardising gate takes its input statistics from the same instructions first; it needs
    no labels for that, so it gets them even when gate pretraining is skipped.
    """
    if model.gate is None:
        return None
    fit = cfg.gate_pretrain_steps > 0
    if not fit and model.gate.norm != "standardise":
        return None
    pool = [ex for ex in examples if ex.task_id >= 0] if fit else list(examples)
    if not pool:
        raise TrainingError("gate pretraining needs examples with task labels" if fit else "no training examples")
    rng = random.Random(cfg.seed)
    chosen = rng.sample(pool, min(cfg.gate_pretrain_samples, len(pool)))
    feats = gate_features(model, chosen, pad_id=pad_id, batch_size=cfg.eval_batch_size, progress=progress, cache=cache)
    model.gate.fit_input_statistics(feats)
    if not fit:
        return None
    targets = expert_targets(torch.tensor([ex.task_id for ex in chosen]), model.experts)
    return fit_gate(model, feats, targets, steps=cfg.gate_pretrain_steps, lr=cfg.gate_pretrain_lr, seed=cfg.seed, progress=progress)


def fit_gate(
    model: MoPsModel, feats: torch.Tensor, targets: torch.Tensor, *, steps: int, lr: float, seed: int, progress: bool = False
) -> float:
    """Minibatch cross-entropy of the gate's scores against the expert targets; returns train accuracy."""
    feats, targets = feats.to(model.device), targets.to(model.device)
    optimizer = torch.optim.AdamW(model.gate.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    minibatch = min(32, len(feats))
    for _ in tqdm(range(steps), desc="gate pretraining", disable=not progress, leave=False):
        idx = torch.randint(0, len(feats), (minibatch,), generator=generator).to(model.device)
        loss = F.nll_loss(model.gate(feats[idx]), targets[idx])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        return (model.gate.logits(feats).argmax(-1) == targets).float().mean().item()
