import copy
import logging
import shutil

import torch
from helpers import tiny_settings, toy_records

from mops_core.activations import ActivationCache, tokenizer_identity
from mops_core.centralized import build_model
from mops_core.data import TASKS, Formatter, collate


def batches(tokenizer, n=6):
    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:3], 2))
    return [collate(examples[i : i + 3], tokenizer.pad_token_id) for i in range(0, n, 3)]


def models(pretrained_base, tokenizer, tmp_path, **flat):
    settings = tiny_settings(**{"activation-cache": False, **flat})
    plain = build_model(settings, copy.deepcopy(pretrained_base), tokenizer)
    with torch.no_grad():
        plain.input_prompts.normal_(0, 0.3)
        plain.init_prompts_from_input()
        plain.gate.fc2.weight.normal_()
    cached = copy.deepcopy(plain)
    cached.activation_cache = ActivationCache(cached, tokenizer_identity(tokenizer), directory=tmp_path, memory_mb=64, disk_mb=64)
    return plain, cached


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_steps_give_the_same_loss_and_gradients(pretrained_base, tokenizer, tmp_path):
    plain, cached = models(pretrained_base, tokenizer, tmp_path)
    cache = cached.activation_cache
    for visit in range(2):
        for batch in batches(tokenizer):
            expected_loss, expected = loss_and_grads(plain, batch)
            loss, grads = loss_and_grads(cached, batch)
            torch.testing.assert_close(loss, expected_loss, atol=1e-6, rtol=1e-6)
            assert grads.keys() == expected.keys() == {"prompts", "gate.fc1.weight", "gate.fc1.bias", "gate.fc2.weight", "gate.fc2.bias"}
            for name in grads:
                torch.testing.assert_close(grads[name], expected[name], atol=1e-6, rtol=1e-5)
    assert cache.misses == 6 and cache.hits == 6  # computed once, reused on the second visit


def test_entries_of_another_base_prompts_or_layer_are_never_used(pretrained_base, tokenizer, tmp_path):
    plain, cached = models(pretrained_base, tokenizer, tmp_path)
    batch = batches(tokenizer)[0]
    cached(**batch)
    written = sorted(tmp_path.rglob("*.safetensors"))
    assert len(written) == 3
    # New input prompts: another identity, so nothing old is read and every sample is computed afresh.
    with torch.no_grad():
        cached.input_prompts.add_(0.5)
        plain.input_prompts.add_(0.5)
    cached.activation_cache.memory.clear()
    misses = cached.activation_cache.misses
    torch.testing.assert_close(cached(**batch).loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)
    assert cached.activation_cache.misses == misses + 3 and cached.activation_cache.disk_hits == 0
    # Another injection layer or another base: other identities as well.
    identity = cached.activation_cache.identity(cached)
    cached.inject_layer = 1
    assert cached.activation_cache.identity(cached) != identity
    cached.inject_layer = 2
    pruned = copy.deepcopy(cached)
    with torch.no_grad():
        pruned.base.model.layers[0].mlp.up_proj.weight[0, 0] = 0.0
    other_base = ActivationCache(pruned, tokenizer_identity(tokenizer), directory=tmp_path, memory_mb=1, disk_mb=1)
    assert other_base.identity(pruned) != identity
    # A foreign file placed where an entry is expected is refused by its recorded identity.
    fresh_identity = cached.activation_cache.identity(cached)
    ids = batch["input_ids"][0, : int(batch["attention_mask"][0].sum())].tolist()
    target = cached.activation_cache._path(fresh_identity, ActivationCache.sample_key(fresh_identity, ids))
    target.unlink()
    shutil.copy(written[0], target)
    cached.activation_cache.memory.clear()
    torch.testing.assert_close(cached(**batch).loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)


def test_a_truncated_entry_is_recomputed_with_a_warning(pretrained_base, tokenizer, tmp_path, caplog):
    plain, cached = models(pretrained_base, tokenizer, tmp_path)
    batch = batches(tokenizer)[0]
    cached(**batch)
    for path in tmp_path.rglob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:100])
    cached.activation_cache.memory.clear()
    with caplog.at_level(logging.WARNING):
        loss = cached(**batch).loss
    assert "unusable" in caplog.text and "recomputing" in caplog.text
    torch.testing.assert_close(loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)


def test_a_fresh_process_starts_warm_from_disk(pretrained_base, tokenizer, tmp_path):
    plain, cached = models(pretrained_base, tokenizer, tmp_path)
    batch = batches(tokenizer)[0]
    cached(**batch)
    later = copy.deepcopy(plain)  # as a new ClientApp process would build it
    later.activation_cache = ActivationCache(later, tokenizer_identity(tokenizer), directory=tmp_path, memory_mb=64, disk_mb=64)
    torch.testing.assert_close(later(**batch).loss, plain(**batch).loss, atol=1e-6, rtol=1e-6)
    assert later.activation_cache.disk_hits == 3 and later.activation_cache.misses == 0
