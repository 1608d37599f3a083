"""One setup path: settings in, a MoPs model ready to train or evaluate out.

    settings -> base (loaded, compressed, cached) + tokenizer -> MoPs model (P1 at its start)
             -> activation cache -> data (tokenised when first asked for)

`mops train`, `mops eval / generate / inspect`, the ServerApp and the ClientApp all start from
`Session.open`, so that a setting acts the same wherever it is given (flag, TOML, run-config).
The start state (P1 tuned, experts from it, gate pretrained) comes next: `start_state`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import checkpoint
from .activations import ActivationCache, tokenizer_identity
from .allocator import keep_freed_memory
from .compression.pipeline import prepare_base
from .config import Settings
from .data import Example, Formatter, PreparedData, pad_token_id, prepare, run_tasks
from .evaluate import EvalResult, evaluate
from .generate import Generator
from .metrics import GenerationResult, generation_scores
from .loading import cache_root
from .model import MoPsModel
from .train import (GateRegulariser, StepStats, init_input_prompts, make_mops_optimizer, make_personal_optimizer,
                    train_steps)


def sink_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if sink is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to use as the attention sink")
    return sink


def build_model(settings: Settings, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> MoPsModel:
    """The MoPs model on `base`, the gate initialised from `seed` and P1 at its starting point."""
    if settings.mops.experts < 1:
        raise ValueError("experts is 0 (one per task): resolve it for the run's tasks with Settings.for_tasks, as Session.open does")
    train = settings.train
    if base.device.type == "cpu":  # the step's large buffers come from malloc: keep them for the next step
        keep_freed_memory()
    torch.manual_seed(train.seed)
    model = MoPsModel(base, settings.mops, sink_token_id(tokenizer)).to(base.device)
    model.compile_layers = settings.model.compile
    text_ids = tokenizer(train.input_prompt_text, add_special_tokens=False)["input_ids"] if train.input_prompt_init == "text" else None
    init_input_prompts(model, torch.Generator().manual_seed(train.seed), text_ids)
    return model


@dataclass
class Session:
    settings: Settings
    base: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    model: MoPsModel
    cache: ActivationCache | None  # the states entering inject_layer, per sample (exact: all below is frozen)
    tasks: tuple[str, ...]  # the run's tasks in expert order: task i's id is i

    @classmethod
    def open(cls, settings: Settings, *, tasks: Sequence[str] | None = None, progress: bool = True) -> Session:
        """`tasks` are the run's (a client gets them from the server); by default they come from the data,
        and `experts` 0 becomes one per task, so `session.settings` may differ from `settings` there."""
        tasks = tuple(tasks) if tasks is not None else run_tasks(settings.data)
        settings = settings.for_tasks(tasks)
        base, tokenizer = prepare_base(settings, progress=progress)
        model = build_model(settings, base, tokenizer)
        train, cache = settings.train, None
        if train.activation_cache:
            cache = ActivationCache(
                model, tokenizer_identity(tokenizer), directory=cache_root(settings.model) / "activations",
                memory_mb=train.activation_cache_mb, disk_mb=train.activation_cache_disk_mb,
            )
        return cls(settings, base, tokenizer, model, cache, tasks)

    @classmethod
    def from_checkpoint(cls, path: str | Path, overrides: dict | None = None, *, progress: bool = True) -> tuple[Session, checkpoint.Checkpoint]:
        """A checkpoint's model on its own (compressed) base, checked against it. `overrides` changes
        settings that do not shape the model (data-dir, eval-samples, model-cache-dir, device, ...)."""
        ckpt = checkpoint.read(path)
        session = cls.open(ckpt.settings.replace(**(overrides or {})), tasks=ckpt.tasks or None, progress=progress)
        checkpoint.load_into(ckpt, session.model)
        return session, ckpt

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @functools.cached_property
    def formatter(self) -> Formatter:
        return Formatter(self.tokenizer, self.settings.data.max_length, self.tasks)

    @functools.cached_property
    def data(self) -> PreparedData:
        """The run's train and test split, tokenised (a client reads only its partition instead)."""
        return prepare(self.settings.data, self.tokenizer, self.tasks)

    def evaluate(self, examples: list[Example] | None = None, *, progress: bool = False, desc: str = "eval") -> EvalResult:
        """Perplexity per task and overall, and the gate per task: on the test split (its first
        `eval-samples`), or on all of `examples` (a client's held-out share)."""
        train = self.settings.train
        return evaluate(
            self.model, self.data.test if examples is None else examples, self.tasks, pad_id=self.pad_id,
            batch_size=train.eval_batch_size, max_samples=train.eval_samples if examples is None else 0,
            cache=self.cache, progress=progress, desc=desc,
        )

    def generation(self, *, progress: bool = False) -> GenerationResult | None:
        """ROUGE-L and exact match of greedy answers to the first `generation-samples` test samples of
        every task; None when that is 0."""
        train = self.settings.train
        if not train.generation_samples:
            return None
        generator = Generator(self.model, self.formatter, self.tokenizer.eos_token_id, self.pad_id)
        return generation_scores(generator, self.data.test_records, self.tasks, per_task=train.generation_samples,
                                 max_new_tokens=train.max_new_tokens, batch_size=train.eval_batch_size, progress=progress)

    @contextlib.contextmanager
    def adapted(self, examples: list[Example], steps: int, *, seed: int) -> Iterator[StepStats]:
        """The model after `steps` steps of what personalizes it (`make_personal_optimizer`) on `examples`,
        for the block only: afterwards every adapter tensor is as it was (a client adapts a copy)."""
        saved = {name: tensor.clone() for name, tensor in self.model.adapter_state_dict().items()}
        train = self.settings.train
        try:
            yield train_steps(self.model, examples, steps, make_personal_optimizer(self.model, train), pad_id=self.pad_id,
                              batch_size=train.batch_size, seed=seed, cache=self.cache, desc="adapt", progress=False)
        finally:
            for parameter in self.model.trainable_parameters():
                parameter.grad = None  # what the optimizer did not own gathered gradients too
            checkpoint.load_adapter_tensors(self.model, saved, source="the adapter before adapting")

    def train(self, examples: list[Example], steps: int, *, seed: int, progress: bool = False, desc: str = "train",
              on_step: Callable[[int, float], None] | None = None) -> StepStats:
        """`steps` optimizer steps of the experts and the gate, with a fresh optimizer (a client's round);
        `on_step(step, loss)` after each (0-based step)."""
        train = self.settings.train
        return train_steps(
            self.model, examples, steps, make_mops_optimizer(self.model, train), pad_id=self.pad_id,
            batch_size=train.batch_size, seed=seed, cache=self.cache, desc=desc, progress=progress,
            regulariser=GateRegulariser.from_config(train), on_step=on_step,
        )
