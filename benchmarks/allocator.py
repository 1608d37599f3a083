"""The cached MoPs training step with glibc's default malloc, then with freed memory kept (`mops_core/allocator.py`).

    python benchmarks/allocator.py [--dtype bfloat16] [--steps 15] [--rounds 3]

glibc's settings cannot be undone within a process, so each round is a fresh process that times
`--steps` steps with glibc's own (dynamic) thresholds and then as many after
`keep_freed_memory()`, counting the minor page faults of each step. The ratio within each
process is what compares; rounds repeat it, since a shared machine's speed drifts.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_process(dtype: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_time import mops_steps, sample_batch

    from mops_core import allocator, session
    from mops_core.config import Settings
    from mops_core.loading import load_base

    session.keep_freed_memory = lambda: False  # building the model must not set it before the first half
    settings = Settings.from_flat({"model": "smollm2", "dtype": dtype, "inject-layer": 9, "experts": 7})
    base, tokenizer = load_base(settings.model)
    batch = sample_batch(base.config.vocab_size, 256, 128)
    step = mops_steps(settings, base, tokenizer, batch)["mops cached"]

    def timed() -> tuple[float, float]:
        for _ in range(3):
            step()
        faults, times = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, []
        for _ in range(steps):
            started = time.perf_counter()
            step()
            times.append(time.perf_counter() - started)
        return statistics.median(times), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps

    default = timed()
    if not allocator.keep_freed_memory():
        raise SystemExit("this C library is not glibc: nothing to compare")
    kept = timed()
    return {"default": default, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a round's own process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_process(args.dtype, args.steps)))
        return
    print(f"SmolLM2 cached MoPs step, {args.dtype}, seq 256 + 70 prompts, batch 1, median of {args.steps} steps each")
    print(f"{'round':>5s} {'glibc default s':>16s} {'faults/step':>12s} {'kept s':>8s} {'faults/step':>12s} {'kept / default':>15s}")
    ratios = []
    for number in range(1, args.rounds + 1):
        done = subprocess.run([sys.executable, __file__, "--one", "--dtype", args.dtype, "--steps", str(args.steps)],
                              capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        (d, df), (k, kf) = result["default"], result["kept"]
        ratios.append(k / d)
        print(f"{number:5d} {d:16.4f} {df:12.0f} {k:8.4f} {kf:12.0f} {k / d:14.3f}x")
    print(f"median ratio {statistics.median(ratios):.3f}x")


if __name__ == "__main__":
    main()
