"""A training process reuses the memory of a step's large buffers instead of faulting it in again."""

import platform
import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys, torch
from mops_core.allocator import keep_freed_memory

def faults_per_cycle():
    for _ in range(2):
        torch.empty(5 << 20).fill_(1.0)  # 20 MiB, as a step's logits or saved activations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.empty(5 << 20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10

glibc_default = faults_per_cycle()
assert keep_freed_memory() and keep_freed_memory()  # once per process; asking again changes nothing
print(glibc_default, faults_per_cycle())
"""


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_freed_step_sized_buffer_is_reused_without_page_faults():
    done = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    default, kept = map(float, done.stdout.split())
    if default < 200:  # e.g. transparent huge pages for every mapping: little to save
        pytest.skip(f"glibc's default faulted only {default} pages per 20 MiB buffer here")
    assert kept < default / 20, f"{kept} page faults per cycle against {default}: the freed buffer was not reused"


def test_building_a_model_on_cpu_keeps_freed_memory(monkeypatch, pretrained_base, tokenizer):
    from helpers import tiny_settings

    from mops_core import allocator, session

    calls = []
    monkeypatch.setattr(session, "keep_freed_memory", lambda: calls.append(1) or True)
    session.build_model(tiny_settings(), pretrained_base, tokenizer)
    assert calls == [1] and allocator.MMAP_THRESHOLD == 32 << 20
