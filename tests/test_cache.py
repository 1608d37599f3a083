"""The machine's cache: every kind records its use, pruning deletes exactly the unused entries."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from mops_core import cache
from mops_core.atomic import file_lock
from mops_core.cli import main

DAY = 86400.0


def _entry(path: Path, size: int, age_days: float, *, lock: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "weights.safetensors").write_bytes(b"x" * size)
    if lock:
        path.with_name(path.name + ".lock").touch()
    return _aged(path, age_days)


def _aged(path: Path, age_days: float) -> Path:
    when = time.time() - age_days * DAY
    os.utime(path, (when, when))
    return path


def test_prune_deletes_exactly_the_entries_unused_for_the_time_given(tmp_path):
    root = tmp_path / "cache"
    old = _entry(root / "compressed" / "sparsegpt-0.75-aaaa", 1000, 10)
    recent = _entry(root / "compressed" / "sparsegpt-0.75-bbbb", 300, 0.5)
    busy = _entry(root / "start-states" / "cccc", 50, 10)
    prompts = _entry(root / "input-prompts" / ("d" * 32), 20, 3)
    states = _entry(root / "activations" / "eeee", 0, 10, lock=False)
    (states / "ab").mkdir()
    (states / "ab" / "abcd.safetensors").write_bytes(b"y" * 700)
    _aged(states, 10)
    dead_write = _aged(_entry(root / "compressed" / ".sparsegpt-0.75-ffff.k3j2.tmp", 40, 10, lock=False), 10)
    live_write = _entry(root / "start-states" / ".gggg.x1y2.tmp", 40, 0.01, lock=False)  # being written now
    dead_sample = states / "ab" / ".abcd.safetensors.123.tmp"  # a per-sample write whose process died
    dead_sample.write_bytes(b"z" * 5)
    _aged(dead_sample, 10)
    _aged(states / "ab", 10)
    _aged(states, 10)
    other = root / "compressed" / "notes.txt"  # not ours: never listed, never deleted
    other.write_text("keep")
    _aged(other, 100)

    listed = {e.path: e for e in cache.entries(root)}
    assert set(listed) == {old, recent, busy, prompts, states, dead_write, live_write, dead_sample}
    assert listed[states].bytes == 705 and listed[old].bytes == 1000
    assert [e.unfinished for e in (listed[dead_write], listed[dead_sample], listed[old])] == [True, True, False]
    assert [e.path for e in cache.entries(root)][-1] == live_write  # oldest use first

    def kept():
        return {p for p in (old, recent, busy, prompts, states, dead_write, live_write, dead_sample, other) if p.exists()}

    with file_lock(busy.with_name(busy.name + ".lock")):  # another process is reading or building it
        would, busy_now = cache.prune(root, 2 * DAY, dry_run=True)
        assert kept() == {old, recent, busy, prompts, states, dead_write, live_write, dead_sample, other}
        deleted, busy_now = cache.prune(root, 2 * DAY)
    assert {e.path for e in deleted} == {e.path for e in would} == {old, prompts, states, dead_write, dead_sample}
    assert [e.path for e in busy_now] == [busy]
    assert kept() == {recent, busy, live_write, other}
    assert not old.with_name(old.name + ".lock").exists() and busy.with_name(busy.name + ".lock").exists()
    assert not list(root.rglob("*.pruned-*"))

    deleted, _ = cache.prune(root, 0)  # nothing in use: everything but a write in flight goes
    assert kept() == {live_write, other}
    with pytest.raises(ValueError, match="at least 0"):
        cache.prune(root, -1)


def test_every_cache_records_its_use_so_a_run_keeps_what_it_reads(tiny_model_dir, toy_data_dir, tmp_path):
    from mops_core.config import Settings
    from mops_core.session import Session
    from mops_core.start_state import load_input_prompts, prepare_or_load, store_input_prompts, tensor_sha

    settings = Settings.from_flat({
        "model": str(tiny_model_dir), "model-cache-dir": str(tmp_path / "cache"), "data-dir": str(toy_data_dir),
        "compression": "magnitude:0.5", "samples": 70, "max-length": 48, "prompts-per-expert": 2,
        "input-prompt-steps": 2, "gate-pretrain-steps": 2, "eval-samples": 4, "compile": False,
    })

    def use_everything():
        session = Session.open(settings, progress=False)
        prepare_or_load(session, progress=False)
        sha = tensor_sha(session.model.input_prompts)
        store_input_prompts(settings, session.model.input_prompts, sha)
        load_input_prompts(session.model, settings, sha)
        session.evaluate()
        return session

    use_everything()
    root = tmp_path / "cache"
    kinds = {e.kind for e in cache.entries(root)}
    assert kinds == {"compressed", "start-states", "input-prompts", "activations"}
    for entry in cache.entries(root):
        _aged(entry.path, 30)
    assert len(cache.prune(root, 40 * DAY, dry_run=True)[0]) == 0
    assert len(cache.prune(root, 20 * DAY, dry_run=True)[0]) == 4

    use_everything()  # a second run reads every entry from the cache
    unused = [e.path for e in cache.entries(root) if time.time() - e.last_used > DAY]
    assert unused == [], f"read but not recorded as used: {unused}"
    assert cache.prune(root, DAY) == ([], [])


def test_the_cache_command_lists_and_prunes(tmp_path, capsys):
    root = tmp_path / "cache"
    old = _entry(root / "compressed" / "wanda-0.5-aaaa", 3 * 2**20, 9)
    recent = _entry(root / "activations" / "bbbb", 2**20, 1, lock=False)

    assert main(["cache", "--model-cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    for kind in cache.KINDS:
        assert kind in out
    assert "3.0 MiB" in out and "1.0 MiB" in out

    assert main(["cache", "prune", "--model-cache-dir", str(root)]) == 2
    assert "--unused-days" in capsys.readouterr().out
    assert main(["cache", "prune", "--unused-days", "5", "--dry-run", "--model-cache-dir", str(root)]) == 0
    assert "would delete 1 entries, 3.0 MiB" in capsys.readouterr().out and old.exists()
    assert main(["cache", "prune", "--unused-days", "5", "--model-cache-dir", str(root)]) == 0
    assert "deleted 1 entries, 3.0 MiB" in capsys.readouterr().out
    assert not old.exists() and recent.exists()
    with pytest.raises(SystemExit):
        main(["cache", "prune", "--unused-days", "-1", "--model-cache-dir", str(root)])
    assert "argument --unused-days: must be at least 0 days" in capsys.readouterr().err


def test_a_dequantised_gguf_base_records_its_use(tiny_model_dir, tmp_path):
    import shutil

    from mops_core.config import ModelConfig
    from mops_core.loading import _dequantised_cache_dir, load_base, resolve_source

    folder = tmp_path / "gguf-model"
    folder.mkdir()
    (folder / "tiny.Q4_1.gguf").write_bytes(b"GGUF")  # never parsed: its dequantised copy is cached already
    cfg = ModelConfig(model=str(folder), model_cache_dir=str(tmp_path / "cache"), compile=False)
    cached = _dequantised_cache_dir(cfg, resolve_source(cfg.model))
    shutil.copytree(tiny_model_dir, cached)
    _aged(cached, 30)
    assert [e.path for e in cache.prune(cfg.model_cache_dir, DAY, dry_run=True)[0]] == [cached]
    load_base(cfg)
    assert cache.prune(cfg.model_cache_dir, DAY) == ([], [])


def test_a_run_names_the_command_once_enough_of_the_cache_went_unused(tmp_path):
    root = tmp_path / "cache"
    _entry(root / "compressed" / "wanda-0.5-aaaa", 3000, 40)
    _entry(root / "start-states" / "bbbb", 5000, 2)
    assert cache.stale_note(root, min_bytes=3001) is None  # the recent entry does not count
    note = cache.stale_note(root, min_bytes=3000)
    assert note is not None and "`mops cache prune --unused-days 30`" in note and str(root) in note
    assert cache.stale_note(root, unused_days=50, min_bytes=1) is None
    assert cache.stale_note(tmp_path / "none") is None
