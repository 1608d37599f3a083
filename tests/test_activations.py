import copy
import logging
import shutil

import torch
from helpers import tiny_settings, toy_records

from mops_core.activations import ActivationCache, entering, tokenizer_identity
from mops_core.data import TASKS, Formatter, collate
from mops_core.session import build_model


def batches(tokenizer, n=6):
    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:3], 2))
    return [collate(examples[i : i + 3], tokenizer.pad_token_id) for i in range(0, n, 3)]


def models(pretrained_base, tokenizer, tmp_path, **flat):
    """The same model twice; the second with a cache of its states entering inject_layer."""
    settings = tiny_settings(**{"activation-cache": False, **flat})
    plain = build_model(settings, copy.deepcopy(pretrained_base), tokenizer)
    with torch.no_grad():
        plain.input_prompts.normal_(0, 0.3)
        plain.init_prompts_from_input()
        plain.gate.fc2.weight.normal_()
    cached = copy.deepcopy(plain)
    return plain, cached, new_cache(cached, tokenizer, tmp_path)


def new_cache(model, tokenizer, directory, mb=64):
    return ActivationCache(model, tokenizer_identity(tokenizer), directory=directory, memory_mb=mb, disk_mb=mb)


def run(model, batch, cache=None):
    """A forward the way the trainer runs it: the cache supplies the states entering inject_layer."""
    return model(**batch, entering=None if cache is None else entering(model, batch, cache))


def loss_and_grads(model, batch, cache=None):
    model.zero_grad(set_to_none=True)
    out = run(model, batch, cache)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_steps_give_the_same_loss_and_gradients(pretrained_base, tokenizer, tmp_path):
    plain, cached, cache = models(pretrained_base, tokenizer, tmp_path)
    for visit in range(2):
        for batch in batches(tokenizer):
            expected_loss, expected = loss_and_grads(plain, batch)
            loss, grads = loss_and_grads(cached, batch, cache)
            torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
            assert grads.keys() == expected.keys() == {"prompts", "gate.fc1.weight", "gate.fc1.bias", "gate.fc2.weight", "gate.fc2.bias"}
            for name in grads:
                torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5)
    assert cache.misses == 6 and cache.hits == 6  # computed once, reused on the second visit


def test_entries_of_another_base_prompts_or_layer_are_never_used(pretrained_base, tokenizer, tmp_path):
    plain, cached, cache = models(pretrained_base, tokenizer, tmp_path)
    batch = batches(tokenizer)[0]
    run(cached, batch, cache)
    written = sorted(tmp_path.rglob("*.safetensors"))
    assert len(written) == 3
    # New input prompts: another identity, so nothing old is read and every sample is computed afresh.
    with torch.no_grad():
        cached.input_prompts.add_(0.5)
        plain.input_prompts.add_(0.5)
    cache.memory.clear()
    misses = cache.misses
    torch.testing.assert_close(run(cached, batch, cache).loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)
    assert cache.misses == misses + 3 and cache.disk_hits == 0
    # Another injection layer or another base: other identities as well.
    identity = cache.identity(cached)
    cached.inject_layer = 1
    assert cache.identity(cached) != identity
    cached.inject_layer = 2
    pruned = copy.deepcopy(cached)
    with torch.no_grad():
        pruned.base.model.layers[0].mlp.up_proj.weight[0, 0] = 0.0
    assert new_cache(pruned, tokenizer, tmp_path, mb=1).identity(pruned) != identity
    # A foreign file placed where an entry is expected is refused by its recorded identity.
    fresh_identity = cache.identity(cached)
    ids = batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist()
    target = cache._path(fresh_identity, ActivationCache.sample_key(fresh_identity, ids))
    target.unlink()
    shutil.copy(written[0], target)
    cache.memory.clear()
    torch.testing.assert_close(run(cached, batch, cache).loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)


def test_a_truncated_entry_is_recomputed_with_a_warning(pretrained_base, tokenizer, tmp_path, caplog):
    plain, cached, cache = models(pretrained_base, tokenizer, tmp_path)
    batch = batches(tokenizer)[0]
    run(cached, batch, cache)
    for path in tmp_path.rglob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    cache.memory.clear()
    with caplog.at_level(logging.WARNING):
        loss = run(cached, batch, cache).loss
    assert "unusable" in caplog.text and "recomputing" in caplog.text
    torch.testing.assert_close(loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)


def test_a_fresh_process_starts_warm_from_disk(pretrained_base, tokenizer, tmp_path):
    plain, cached, cache = models(pretrained_base, tokenizer, tmp_path)
    batch = batches(tokenizer)[0]
    run(cached, batch, cache)
    later = copy.deepcopy(plain)  # as a new ClientApp process would build it
    later_cache = new_cache(later, tokenizer, tmp_path)
    torch.testing.assert_close(run(later, batch, later_cache).loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)
    assert later_cache.disk_hits == 3 and later_cache.misses == 0


def test_the_memory_and_disk_limits_hold(pretrained_base, tokenizer, tmp_path):
    """activation-cache-mb bounds the states kept in memory (oldest out first); activation-cache-disk-mb those on disk."""
    plain, cached, _ = models(pretrained_base, tokenizer, tmp_path)
    one_sample = 64 * cached.width * 4  # at most max-length text states of float32
    small = ActivationCache(cached, tokenizer_identity(tokenizer), directory=tmp_path, memory_mb=2.5 * one_sample / 2**20, disk_mb=0)
    for batch in batches(tokenizer):
        torch.testing.assert_close(run(cached, batch, small).loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)
    assert 0 < len(small.memory) < 6 and small.memory_bytes <= small.memory_limit
    assert not list(tmp_path.rglob("*.safetensors")), "a disk limit of 0 writes nothing"
    roomy = new_cache(cached, tokenizer, tmp_path)
    for batch in batches(tokenizer):
        run(cached, batch, roomy)
    assert len(roomy.memory) == 6 and len(list(tmp_path.rglob("*.safetensors"))) == 6


def test_a_run_goes_on_when_its_entries_cannot_be_written_or_are_pruned_away(pretrained_base, tokenizer, tmp_path, caplog, monkeypatch):
    from mops_core import activations

    plain, cached, cache = models(pretrained_base, tokenizer, tmp_path)
    first, second = batches(tokenizer)
    run(cached, first, cache)
    shutil.rmtree(next(tmp_path.iterdir()))  # what `mops cache prune` does to an entry in use
    cache.memory.clear()
    torch.testing.assert_close(run(cached, first, cache).loss, plain(**first).loss, atol=1e-6, rtol=1e-6)
    assert cache.misses == 6 and len(list(tmp_path.rglob("*.safetensors"))) == 3  # recomputed and kept again

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(activations, "save_file", full_disk)
    with caplog.at_level(logging.WARNING):
        loss = run(cached, second, cache).loss
    torch.testing.assert_close(loss, plain(**second).loss, atol=1e-6, rtol=1e-6)
    assert "No space left on device" in caplog.text and "recomputed" in caplog.text
    assert not list(tmp_path.rglob("*.tmp")) and len(list(tmp_path.rglob("*.safetensors"))) == 3
