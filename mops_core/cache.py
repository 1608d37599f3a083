"""The machine's cache of derived results: what it holds, when each entry was last used, pruning.

Every cached result is a pure function of its key, and every key names the code that computed it
(`loading.code_identity`), so an upgrade or a changed setting leaves the old entries unused
rather than wrong. They stay on disk until pruned: `mops cache` lists them, `mops cache prune
--unused-days N` deletes those no run has used for N days.

The layout under the cache root (`model-cache-dir`, else `$MOPS_CACHE_DIR`, else
`~/.cache/mops-fl`) is one folder per entry, grouped by kind (`KINDS`). Whoever uses an entry
calls `touch` while holding the entry's lock, so its folder's modification time is its last use
and a pruner that takes the same lock never deletes an entry from under a reader that found it.
The activation cache has no lock (each file is written atomically and a missing one is
recomputed), so pruning one of its entries mid-run costs a recomputation, never a wrong result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

KINDS = {
    "models": "GGUF bases dequantised to a Hugging Face copy",
    "compressed": "compressed bases (pruned weights)",
    "start-states": "start states: pretrained input prompts, experts and gate",
    "input-prompts": "frozen input prompts received from a server",
    "activations": "hidden states entering inject-layer, per sample",
}
LOCK_SUFFIX = ".lock"
# A write's temporary lives seconds (a rename ends it), so one older than this was left by a
# process that died; younger ones may still be in flight and are never pruned.
UNFINISHED_GRACE_S = 3600.0


@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch
    unfinished: bool = False  # a write that never completed (its process died), not a usable entry


def touch(path: str | Path) -> None:
    """Record a use of the entry at `path` (a read-only or foreign cache is used without a record)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _unfinished(name: str) -> bool:
    """Leftovers of interrupted atomic writes: `.NAME.XXXX.tmp`, `.NAME.old-PID` (see `atomic`)."""
    return name.startswith(".") and (name.endswith(".tmp") or ".old-" in name or ".pruned-" in name)


def entries(root: str | Path, *, used_before: float | None = None) -> list[Entry]:
    """Every entry under `root`, oldest use first; files of other programs are left out.

    `used_before` (seconds since the epoch) keeps only entries last used by then, and spares
    measuring the others: a live activation cache holds tens of thousands of files.
    """
    found = []

    def add(kind: str, path: Path, unfinished: bool) -> None:
        with contextlib.suppress(FileNotFoundError):  # a concurrent writer may rename it away
            used = path.stat().st_mtime
            if used_before is None or used <= used_before:
                found.append(Entry(kind, path, _size(path), used, unfinished))

    for kind in KINDS:
        folder = Path(root) / kind
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            unfinished = _unfinished(path.name)
            if unfinished or (not path.name.startswith(".") and not path.name.endswith(LOCK_SUFFIX) and path.is_dir()):
                add(kind, path, unfinished)
        if kind == "activations":  # an interrupted per-sample write leaves a hidden file two folders down
            for tmp in folder.glob("*/*/.*.tmp"):
                add(kind, tmp, True)
    return sorted(found, key=lambda e: e.last_used)


@contextlib.contextmanager
def _held_if_free(lock: Path) -> Iterator[bool]:
    """Take `lock` without waiting; yield whether it was free (a missing lock file is free)."""
    import fcntl

    try:
        handle = open(lock, "r+")
    except FileNotFoundError:
        yield True
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prune(root: str | Path, unused_for: float, *, dry_run: bool = False, now: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """Delete the entries under `root` not used for `unused_for` seconds.

    Returns (deleted, kept busy): an entry whose lock another process holds is being built or
    read right now and is kept. Each deletion renames the entry's folder away first, so a reader
    sees the whole entry or none of it.
    """
    if unused_for < 0:
        raise ValueError(f"unused-for must be at least 0 seconds, got {unused_for}")
    now = time.time() if now is None else now
    cutoff = now - unused_for
    deleted, busy = [], []
    for entry in entries(root, used_before=cutoff):
        if entry.unfinished and entry.last_used > now - UNFINISHED_GRACE_S:
            continue
        lock = entry.path.with_name(entry.path.name + LOCK_SUFFIX)
        with _held_if_free(lock) as free:
            if not free:
                busy.append(entry)
                continue
            try:
                if entry.path.stat().st_mtime != entry.last_used:  # used while we looked
                    continue
            except FileNotFoundError:
                continue
            deleted.append(entry)
            if dry_run:
                continue
            if entry.path.is_dir():
                gone = entry.path.with_name(f".{entry.path.name}.pruned-{os.getpid()}")
                os.replace(entry.path, gone)
                shutil.rmtree(gone, ignore_errors=True)
            else:
                entry.path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
    return deleted, busy


def stale_note(root: str | Path, *, unused_days: int = 30, min_bytes: int = 2**30, now: float | None = None) -> str | None:
    """A line for a run's log when at least `min_bytes` of the cache went unused for `unused_days`
    (what every upgrade leaves behind), naming the command that frees it; None otherwise."""
    cutoff = (time.time() if now is None else now) - unused_days * 86400
    stale = sum(e.bytes for e in entries(root, used_before=cutoff))
    if stale < min_bytes:
        return None
    return (f"the cache at {root} holds {stale / 2**30:.1f} GiB that no run has used for {unused_days} days; "
            f"`mops cache prune --unused-days {unused_days}` deletes it")
