"""The start state every federated participant shares: frozen P1, initial prompts, pretrained gate.

The paper treats the pretrained input prompts P1 like the compressed base: part of the frozen
model every client holds, never part of what is averaged. The server prepares the start
state once (or loads it from the cache) and stores it as an adapter checkpoint under a key
derived from everything that determines it, the code that computes it included (its bfloat16
pretraining carries a change of kernel or rounding on into the perplexities a run starts from).
What a client lacks of it is P1 alone (the experts and the gate arrive with every round), so P1
is also kept content-addressed, under its hash: the server publishes it in its own cache (a
simulated client, or a node sharing the machine, finds it there) and sends it once to a node that
reports lacking it; the node checks the hash before it stores anything. No client ever trains
against input prompts other than the server's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import checkpoint
from .atomic import directory, file_lock
from .cache import touch
from .config import Settings
from .loading import FORWARD_CODE, base_fingerprint, cache_root, code_identity
from .model import INPUT_PROMPTS, MoPsModel
from .session import Session
from .train import pretrain_gate, pretrain_input_prompts

# Settings that change the start state; everything else (rounds, local steps, lr, ...) does not.
_TRAIN_KEYS = (
    "seed", "batch_size", "input_prompt_init", "input_prompt_text", "input_prompt_steps", "input_prompt_lr",
    "gate_pretrain_steps", "gate_pretrain_samples", "gate_pretrain_lr", "eval_batch_size",
)
# The code that computes it: the forward, the data it trains on, the trainers (the gate's through the activation cache).
_CODE = (*FORWARD_CODE, "mops_core.activations", "mops_core.data", "mops_core.session", "mops_core.start_state", "mops_core.train")


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


def start_state_key(settings: Settings, model: MoPsModel) -> str:
    determining = {
        "base": base_fingerprint(model.base),
        "model": settings.model.model,
        # What `dtype = "auto"` became here, and where: a cache shared by machines with and
        # without bfloat16 units (or a GPU) must not hand one's start state to the other.
        "dtype": str(model.dtype),
        "device": model.device.type,
        "mops": dataclasses.asdict(settings.mops),
        "data": dataclasses.asdict(settings.data),
        "train": {k: getattr(settings.train, k) for k in _TRAIN_KEYS},
        "code": code_identity(*_CODE),
    }
    return hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:24]


def start_state_dir(settings: Settings, key: str) -> Path:
    return cache_root(settings.model) / "start-states" / key


def prepare_or_load(session: Session, *, progress: bool = True) -> tuple[str, StartState | None]:
    """Bring the session's model to the start state; compute it only if the cache does not hold it.

    Returns the cache key and, when computed now, what pretraining reported.
    """
    settings, model = session.settings, session.model
    key = start_state_key(settings, model)
    path = start_state_dir(settings, key)
    with file_lock(path.with_name(path.name + ".lock")):
        if (path / checkpoint.CONFIG_FILE).exists():
            checkpoint.load_into(checkpoint.read(path), model)
            touch(path)
            return key, None
        report = prepare(session, progress=progress)
        checkpoint.save(path, model, settings, list(session.data.tasks), extra={"start_state": dataclasses.asdict(report)})
    return key, report


def input_prompts_path(settings: Settings, sha: str) -> Path:
    """Where P1 with content hash `sha` lives in this machine's cache (a hash that came in a message
    names no other path)."""
    if not re.fullmatch(r"[0-9a-f]{32}", sha):
        raise StartStateError(f"{sha!r} is not an input-prompts hash (32 hex digits)")
    return cache_root(settings.model) / "input-prompts" / sha / "input_prompts.safetensors"


# Begins every error a node raises for want of intact input prompts. The server admits such a node
# again, and so sends them, before it next samples it: a cache pruned or damaged mid-run heals.
LACKS_INPUT_PROMPTS = "this node lacks the run's input prompts"


def _intact(path: Path, sha: str) -> torch.Tensor | None:
    """P1 as stored at `path` if it is the tensor `sha` names; None when the file is missing,
    unreadable, holds no P1 or another tensor."""
    try:
        prompts = load_file(str(path)).get(INPUT_PROMPTS)
    except (SafetensorError, OSError, ValueError):
        return None
    return prompts if prompts is not None and tensor_sha(prompts) == sha else None


def has_input_prompts(settings: Settings, sha: str) -> bool:
    """Whether this node holds the input prompts `sha` intact (a damaged copy does not count: the server sends them)."""
    return _intact(input_prompts_path(settings, sha), sha) is not None


def store_input_prompts(settings: Settings, prompts: torch.Tensor, sha: str) -> Path:
    """Keep P1 under its hash, after checking that it is what `sha` says; nothing is written otherwise."""
    path = input_prompts_path(settings, sha)
    prompts = prompts.detach().float().cpu().contiguous()
    if prompts.ndim != 2 or not torch.isfinite(prompts).all():
        raise StartStateError(f"the input prompts {sha} must be a finite (prompts, width) matrix; nothing was stored")
    if tensor_sha(prompts) != sha:
        raise StartStateError(
            f"the input prompts received do not match their hash (expected {sha}, got {tensor_sha(prompts)}); nothing was stored"
        )
    with file_lock(path.parent.with_name(sha + ".lock")):
        if _intact(path, sha) is None:  # a damaged copy is replaced
            with directory(path.parent) as tmp:
                save_file({INPUT_PROMPTS: prompts}, str(tmp / path.name))
    return path


def load_input_prompts(model: MoPsModel, settings: Settings, sha: str) -> None:
    """Install the server's frozen input prompts into a client's model, verified by content hash."""
    path = input_prompts_path(settings, sha)
    with file_lock(path.parent.with_name(sha + ".lock")):  # a pruner takes it too
        prompts = _intact(path, sha)
        if prompts is not None:
            touch(path.parent)
    if prompts is None:
        why = "not in its cache" if not path.is_file() else "unreadable or changed"
        raise StartStateError(f"{LACKS_INPUT_PROMPTS} ({sha}): {path} is {why}; the server sends them again before it next "
                              "samples this node")
    checkpoint.load_adapter_tensors(model, {INPUT_PROMPTS: prompts}, source=str(path), keys=[INPUT_PROMPTS])
