"""Hidden states entering `inject_layer`, computed once per sample and reused every step after.

Everything below the injection point is frozen (the base and the input prompts P1), so the
hidden state entering `inject_layer` is a pure function of the sample. In a causal model the
sink and the K prompt positions never see the text: their states are one shared prefix, and
only the text positions are stored per sample. Whoever trains or evaluates asks the cache for a
batch's states and hands them to the model's forward (`entering=`). A sample's first visit computes
them (in its batch); later steps, epochs, evaluations and federated rounds reuse them:

* in memory, within a process (a Ray actor serves many rounds), bounded by `activation-cache-mb`;
* on disk, one small safetensors file per sample under
  `<model cache>/activations/<identity>/`, bounded by `activation-cache-disk-mb`, so that a
  client's fresh process in a deployment, or a later run, starts warm.

The identity hashes the base's fingerprint, the input prompts, `inject_layer`, the dtype, the
tokenizer and the code of the forward (`loading.code_identity`); each file records its identity
and sample key. An entry written for anything else is never used, and a truncated or corrupted
file is recomputed with a warning.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .cache import touch
from .loading import FORWARD_CODE, base_fingerprint, code_identity
from .model import MoPsModel

log = logging.getLogger(__name__)

_CODE = (*FORWARD_CODE, "mops_core.activations")
_USE_RECORD_S = 3600.0


def tokenizer_identity(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(repr(vocab).encode()).hexdigest()[:16]


class ActivationCache:
    def __init__(self, model: MoPsModel, tokenizer_id: str, *, directory: str | Path | None, memory_mb: float, disk_mb: float):
        self.tokenizer_id = tokenizer_id
        self.base_id = base_fingerprint(model.base)  # the base is frozen: once is enough
        self.root = Path(directory) if directory else None
        self.memory_limit = int(memory_mb * 2**20)
        self.disk_limit = int(disk_mb * 2**20)
        self.memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.memory_bytes = 0
        self.disk_bytes: int | None = None
        self.hits = self.misses = self.disk_hits = 0
        self._used: dict[str, float] = {}  # identity -> when this process last recorded its use on disk

    # ------------------------------------------------------------------ identity

    def identity(self, model: MoPsModel) -> str:
        """Everything the stored states depend on besides the sample; recomputed each batch (P1 may change)."""
        prompts = model.input_prompts.detach().float().cpu().contiguous().numpy().tobytes()
        parts = [
            self.base_id, hashlib.sha256(prompts).hexdigest(), str(model.inject_layer), str(model.dtype), model.device.type, self.tokenizer_id,
            str(model.sink_token_id), code_identity(*_CODE),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]

    @staticmethod
    def sample_key(identity: str, ids: list[int]) -> str:
        return hashlib.sha256(identity.encode() + torch.tensor(ids, dtype=torch.int64).numpy().tobytes()).hexdigest()[:32]

    def _path(self, identity: str, key: str) -> Path | None:
        return None if self.root is None else self.root / identity / key[:2] / f"{key}.safetensors"

    # ------------------------------------------------------------------ storage

    def _remember(self, key: str, states: torch.Tensor) -> None:
        if key in self.memory:
            return
        size = states.numel() * states.element_size()
        if size > self.memory_limit:
            return
        self.memory[key] = states
        self.memory_bytes += size
        while self.memory_bytes > self.memory_limit:
            _, old = self.memory.popitem(last=False)
            self.memory_bytes -= old.numel() * old.element_size()

    def _from_disk(self, identity: str, key: str, length: int, device: torch.device) -> torch.Tensor | None:
        path = self._path(identity, key)
        if path is None or not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as entry:
                meta = entry.metadata() or {}  # what the entry was written for
                states = entry.get_tensor("states")
            if meta.get("identity") != identity or meta.get("key") != key or states.shape[0] != length:
                raise ValueError("it was written for another sample or model")
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            log.warning("activation cache entry %s is unusable (%s); recomputing it", path, exc)
            return None
        return states.to(device)

    def _to_disk(self, identity: str, key: str, states: torch.Tensor) -> None:
        path = self._path(identity, key)
        if path is None:
            return
        if self.disk_bytes is None:
            folder = self.root / identity
            self.disk_bytes = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) if folder.exists() else 0
        size = states.numel() * states.element_size() + 512
        if self.disk_bytes + size > self.disk_limit:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:  # a full disk, or the folder pruned away meanwhile, costs a recomputation later, not the run
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"states": states.detach().cpu().contiguous()}, str(tmp), metadata={"identity": identity, "key": key})
            os.replace(tmp, path)
        except (OSError, SafetensorError) as exc:
            log.warning("could not keep activations in %s (%s); they will be recomputed", path, exc)
            tmp.unlink(missing_ok=True)
            return
        self.disk_bytes += size

    def _record_use(self, identity: str) -> None:
        """Mark the identity's folder used (`mops cache prune` goes by it), hourly rather than per batch."""
        if self.root is None or time.monotonic() - self._used.get(identity, -_USE_RECORD_S) < _USE_RECORD_S:
            return
        self._used[identity] = time.monotonic()
        touch(self.root / identity)

    # ------------------------------------------------------------------ the lower pass, cached

    @torch.no_grad()
    def entering(self, model: MoPsModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """`model.entering(input_ids, attention_mask)`, each sample's text states computed once."""
        identity = self.identity(model)
        self._record_use(identity)
        lengths = attention_mask.sum(1).tolist()
        keys = [self.sample_key(identity, input_ids[i, :n].tolist()) for i, n in enumerate(lengths)]
        found: dict[int, torch.Tensor] = {}
        for i, (key, n) in enumerate(zip(keys, lengths)):
            states = self.memory.get(key)
            if states is not None:
                self.memory.move_to_end(key)
                self.hits += 1
            else:
                states = self._from_disk(identity, key, n, model.device)
                if states is not None:
                    self.disk_hits += 1
                    self._remember(key, states)
            if states is not None:
                found[i] = states
        missing = [i for i in range(len(keys)) if i not in found]
        if missing:
            self.misses += len(missing)
            rows = torch.tensor(missing, device=input_ids.device)
            width = max(lengths[i] for i in missing)
            computed = model.entering(input_ids[rows, :width], attention_mask[rows, :width])
            start = 1 + model.num_prompts
            for j, i in enumerate(missing):
                states = computed[j, start : start + lengths[i]].clone()
                found[i] = states
                self._remember(keys[i], states)
                self._to_disk(identity, keys[i], states)

        prefix = model.lower_prefix().states
        batch, text = input_ids.shape
        hidden = prefix.new_zeros(batch, prefix.shape[0] + text, prefix.shape[1])
        hidden[:, : prefix.shape[0]] = prefix
        for i, n in enumerate(lengths):
            hidden[i, prefix.shape[0] : prefix.shape[0] + n] = found[i]
        return hidden


def entering(model: MoPsModel, batch: dict[str, torch.Tensor], cache: ActivationCache | None) -> torch.Tensor:
    """The states entering `inject_layer` for a batch: from the cache, or computed."""
    if cache is None:
        return model.entering(batch["input_ids"], batch["attention_mask"])
    return cache.entering(model, batch["input_ids"], batch["attention_mask"])
