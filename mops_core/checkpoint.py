"""MoPs checkpoints: PEFT's adapter layout, validated on load.

    CHECKPOINT/
      adapter_config.json        what to rebuild: base identity, MoPs shape, tasks, settings
      adapter_model.safetensors  input_prompts (K, d), prompts (E, K/E, d), gate.fc{1,2}.{weight,bias}

Any safetensors reader can load the tensors; `adapter_config.json` is plain JSON (see the
docs/guide.md, "The checkpoint layout"). Saves are atomic (a new directory replaces the old in one
rename); loads check every tensor's name, shape and finiteness and the base's fingerprint,
and refuse with a message that names the problem.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import atomic
from .config import Settings
from .loading import base_fingerprint
from .model import MoPsModel
from .parsing import SettingsError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT = "mops-fl-adapter"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def settings(self) -> Settings:
        """The settings it was made with; a key this version no longer has is named in a warning and
        left out (as PEFT does with unknown config keys), a key it lacks takes its default."""
        saved = dict(self.config.get("settings") or {})
        unknown = sorted(set(saved) - set(Settings().to_flat()))
        if unknown:
            log.warning("checkpoint %s: ignoring settings this version does not have: %s", self.path, ", ".join(unknown))
        try:
            return Settings.from_flat({k: v for k, v in saved.items() if k not in unknown}, context=f"checkpoint {self.path}")
        except SettingsError as exc:
            raise CheckpointError(f"{self.path / CONFIG_FILE}: {exc}") from exc

    @property
    def tasks(self) -> list[str]:
        return list(self.config.get("tasks", []))


def describe(model: MoPsModel, settings: Settings, tasks: list[str], extra: dict[str, Any] | None = None) -> dict:
    base = model.base.config
    return {
        "format": FORMAT,
        "version": VERSION,
        "peft_type": "MOPS",
        "base_model_name_or_path": settings.model.model,
        "base_fingerprint": base_fingerprint(model.base),
        "base_dims": {
            "hidden_size": base.hidden_size,
            "num_hidden_layers": base.num_hidden_layers,
            "vocab_size": base.vocab_size,
        },
        "inject_layer": model.inject_layer,
        "gating": model.gating,
        "num_experts": model.experts,
        "prompts_per_expert": model.prompts_per_expert,
        "num_virtual_tokens": model.num_prompts,
        "sink_token_id": model.sink_token_id,
        "tasks": list(tasks),
        "settings": settings.to_flat(),
        **(extra or {}),
    }


def save(path: str | Path, model: MoPsModel, settings: Settings, tasks: list[str], extra: dict | None = None) -> Path:
    path = Path(path)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.adapter_state_dict().items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"refusing to save {path}: tensor '{name}' holds NaN or inf")
    with atomic.directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        atomic.write_json(tmp / CONFIG_FILE, describe(model, settings, tasks, extra))
    return path


def read(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a directory")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {needed.name} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is corrupt: {exc}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path} is not a mops-fl adapter config")
    if config.get("version") != VERSION:
        raise CheckpointError(f"{config_path}: unsupported version {config.get('version')!r} (expected {VERSION})")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} is corrupt: {exc}") from None
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{weights_path}: tensor '{name}' holds NaN or inf")
    return Checkpoint(path, config, tensors)


def check_compatible(ckpt: Checkpoint, model: MoPsModel) -> None:
    """Refuse a checkpoint tuned on another base or built with another MoPs shape.

    The base must be the one tuned, to the bit: pruning the same model with the same settings on
    another CPU kind gives other weights, and an adapter scores far worse on them.
    """
    config = ckpt.config
    base = model.base.config
    dims = {"hidden_size": base.hidden_size, "num_hidden_layers": base.num_hidden_layers, "vocab_size": base.vocab_size}
    if config.get("base_dims") != dims:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was tuned on a base with {config.get('base_dims')}, "
            f"but the loaded base has {dims}"
        )
    loaded = base_fingerprint(model.base)
    if config.get("base_fingerprint") != loaded:
        raise CheckpointError(
            f"checkpoint {ckpt.path} was tuned on another base ({config.get('base_model_name_or_path')!r}, "
            f"fingerprint {config.get('base_fingerprint')}); the loaded base has fingerprint {loaded}. "
            "Load the base it was tuned on: the same model and compression, pruned where it was tuned (pruning on "
            "another CPU kind or library version gives other weights): the cache that holds it (model-cache-dir), "
            "or a base exported there with `mops compress --export DIR`, then model = DIR."
        )
    if config.get("inject_layer") != model.inject_layer:
        raise CheckpointError(
            f"checkpoint {ckpt.path} injects at layer {config.get('inject_layer')}, the model at {model.inject_layer}"
        )


def load_into(ckpt: Checkpoint, model: MoPsModel) -> None:
    """Copy a checkpoint's tensors into `model` after checking that they fit (see `check_compatible`)."""
    check_compatible(ckpt, model)
    load_adapter_tensors(model, ckpt.tensors, source=str(ckpt.path))


def tensor_problems(tensors: dict[str, Any], expected: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with a set of named arrays (torch or numpy) for an adapter, or None.

    Checks names (exactly those of `expected`), shapes and finiteness. Checkpoint loads and
    federated reply checks both use it.
    """
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unknown or missing:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unexpected {', '.join(unknown)}"] if unknown else [])
        return f"tensors do not match the model ({'; '.join(parts)})"
    wrong = [
        f"'{name}' has shape {tuple(tensor.shape)}, the model expects {tuple(expected[name])}"
        for name, tensor in sorted(tensors.items())
        if tuple(tensor.shape) != tuple(expected[name])
    ]
    if wrong:
        return f"tensor {'; '.join(wrong)}"
    for name, tensor in sorted(tensors.items()):
        values = torch.as_tensor(tensor)
        if not values.is_floating_point():
            return f"tensor '{name}' has dtype {values.dtype}, expected floating point"
        if not torch.isfinite(values).all():
            return f"tensor '{name}' holds NaN or inf"
    return None


def load_adapter_tensors(
    model: MoPsModel, tensors: dict[str, torch.Tensor], *, source: str, keys: Iterable[str] | None = None
) -> None:
    """Validate names, shapes and values, then copy; nothing is copied if anything is wrong.

    `keys` names the tensors expected (default: the whole adapter); federated updates carry
    the experts and the gate only, a start state's client copy the input prompts only.
    """
    adapter = model.adapter_state_dict()
    wanted = adapter.keys() if keys is None else keys
    expected = {name: tuple(adapter[name].shape) for name in wanted}
    problem = tensor_problems(tensors, expected)
    if problem:
        raise CheckpointError(f"{source}: {problem}")
    live = model.adapter_tensors()
    with torch.no_grad():
        for name, tensor in tensors.items():
            live[name].copy_(torch.as_tensor(tensor).to(live[name].device, live[name].dtype))
