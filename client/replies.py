"""A node's last finished training reply, kept on its disk (`reply-cache-dir`).

A round whose server stops before it ends (a crash, a SuperLink restart, a benchmark session that
runs out) is run again when the run resumes: the same clients, the same global state, the same
seeds. Without this, every client that had finished trains again; on a slow machine that is most
of a round of hours. With it, a client sampled again for the round it already finished replies
with what it computed, bit for bit, at once.

A reply is reused only where everything that decides it is the same: the round, the data
partition, the settings that decide results (not where things are written or how long the server
waits), and the global state the server sent, hashed. A node keeps one reply: writing the next
removes the last. A damaged file is logged and trained again, never sent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from mops_core import atomic
from mops_core.config import RESUMABLE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeptReply:
    arrays: dict[str, torch.Tensor]
    metrics: dict[str, Any]  # the keyword arguments of `protocol.train_reply` besides the arrays


@dataclass(frozen=True)
class ReplyCache:
    folder: Path
    partition: int

    def key(self, number: int, global_state: Mapping[str, np.ndarray], run_config: Mapping[str, Any]) -> str:
        """What decides this node's reply in round `number`: the round, its partition, the run's settings
        (those a resumed run may change are left out: none of them changes a client's training) and the
        arrays the server sent."""
        deciding = {k: v for k, v in run_config.items() if k not in RESUMABLE}
        digest = hashlib.sha256(json.dumps([number, self.partition, deciding], sort_keys=True, default=str).encode())
        for name in sorted(global_state):
            array = np.ascontiguousarray(global_state[name])
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
        return digest.hexdigest()[:32]

    def _path(self, number: int, key: str) -> Path:
        return self.folder / reply_file(self.partition, number, key)

    def get(self, number: int, key: str) -> KeptReply | None:
        path = self._path(number, key)
        if not path.exists():
            return None
        try:
            data = path.read_bytes()
            loaded, about = load(data), _metadata(data)
            arrays = {name: loaded[name] for name in json.loads(about["kept-order"])}  # the order they were sent in
            metrics = json.loads(about["kept-metrics"])
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            log.warning("the reply kept in %s is unreadable (%s): training again", path, exc)
            return None
        return KeptReply(arrays, metrics)

    def put(self, number: int, key: str, arrays: Mapping[str, torch.Tensor], metrics: Mapping[str, Any]) -> None:
        """Keep this reply (atomically) in place of this partition's last one."""
        data = save({k: v.detach().cpu().contiguous() for k, v in arrays.items()},
                    metadata={"kept-metrics": json.dumps(dict(metrics)), "kept-order": json.dumps(list(arrays))})
        path = self._path(number, key)
        atomic.write_bytes(path, data)
        for old in self.folder.glob(f"partition-{self.partition}-*.safetensors"):
            if old != path:
                old.unlink(missing_ok=True)


def reply_file(partition: int, number: int, key: str) -> str:
    return f"partition-{partition}-round-{number}-{key}.safetensors"


def kept_round(name: str) -> int | None:
    """The round a kept reply's file is for, from its name; None for any other file."""
    match = re.fullmatch(r"partition-(-?\d+)-round-(\d+)-[0-9a-f]+\.safetensors", name)
    return int(match.group(2)) if match else None


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory (safetensors' `load` returns tensors only)."""
    header_size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + header_size]).get("__metadata__") or {}
