"""The start state every federated participant shares: frozen P1, initial prompts, pretrained gate.

The paper treats the pretrained input prompts P1 like the compressed base: part of the frozen
model every client holds, never part of what is averaged. The server prepares the start
state once (or loads it from the cache), stores it as an adapter checkpoint under a key
derived from everything that determines it, and names that key in each round's config.
Clients read P1 from the same cache (shared in simulation and on one machine; provisioned
with the base in a real deployment) and check its content hash, so that no client ever
trains against input prompts other than the server's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from . import checkpoint
from .atomic import file_lock
from .config import Settings
from .loading import base_fingerprint, cache_root
from .model import INPUT_PROMPTS, MoPsModel
from .session import Session
from .train import pretrain_gate, pretrain_input_prompts

# Settings that change the start state; everything else (rounds, local steps, lr, ...) does not.
_TRAIN_KEYS = (
    "seed", "batch_size", "input_prompt_init", "input_prompt_text", "input_prompt_steps", "input_prompt_lr",
    "gate_pretrain_steps", "gate_pretrain_samples", "gate_pretrain_lr", "eval_batch_size",
)


@dataclasses.dataclass
class StartState:
    input_prompt_loss: float
    gate_train_accuracy: float | None


def prepare(session: Session, *, progress: bool = True) -> StartState:
    """Bring the session's model to the start state: P1 (as `build_model` started it) tuned and frozen,
    the experts started from its states at `inject_layer`, the gate pretrained on task-labelled instructions."""
    train, examples = session.settings.train, session.data.train
    stats = pretrain_input_prompts(session.model, examples, train, pad_id=session.pad_id, progress=progress)
    accuracy = pretrain_gate(session.model, examples, train, pad_id=session.pad_id, progress=progress, cache=session.cache)
    return StartState(stats.mean_loss, accuracy)


class StartStateError(RuntimeError):
    """A client cannot find, or cannot trust, the start state the server named."""


def tensor_sha(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:32]


def start_state_key(settings: Settings, fingerprint: str) -> str:
    determining = {
        "base": fingerprint,
        "model": settings.model.model,
        "dtype": settings.model.dtype,
        "mops": dataclasses.asdict(settings.mops),
        "data": dataclasses.asdict(settings.data),
        "train": {k: getattr(settings.train, k) for k in _TRAIN_KEYS},
    }
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:24]


def start_state_dir(settings: Settings, key: str) -> Path:
    return cache_root(settings.model) / "start-states" / key


def prepare_or_load(session: Session, *, progress: bool = True) -> tuple[str, StartState | None]:
    """Bring the session's model to the start state; compute it only if the cache does not hold it.

    Returns the cache key and, when computed now, what pretraining reported.
    """
    settings, model = session.settings, session.model
    key = start_state_key(settings, base_fingerprint(model.base))
    path = start_state_dir(settings, key)
    with file_lock(path.with_name(path.name + ".lock")):
        if (path / checkpoint.CONFIG_FILE).exists():
            checkpoint.load_into(checkpoint.read(path), model)
            return key, None
        report = prepare(session, progress=progress)
        checkpoint.save(path, model, settings, list(session.data.tasks), extra={"start_state": dataclasses.asdict(report)})
    return key, report


def load_input_prompts(model: MoPsModel, settings: Settings, key: str, expected_sha: str) -> None:
    """Install the server's frozen input prompts into a client's model, verified by content hash."""
    path = start_state_dir(settings, key)
    try:
        tensors = checkpoint.read(path).tensors
    except checkpoint.CheckpointError as exc:
        raise StartStateError(
            f"start state {key} is not available on this node ({exc}); "
            f"provision {path} with the base model, or run the server on this machine first"
        ) from None
    prompts = tensors.get(INPUT_PROMPTS)
    if prompts is None or tensor_sha(prompts) != expected_sha:
        raise StartStateError(f"start state at {path} does not hold the input prompts the server uses (hash mismatch)")
    checkpoint.load_adapter_tensors(model, {INPUT_PROMPTS: prompts}, source=str(path), keys=[INPUT_PROMPTS])
