"""Whether this checkout computes the same numbers as an earlier commit: for a change that must not
change behaviour (a refactoring), run both and compare.

    python benchmarks/same_numbers.py --before 3759523 [--rounds 3] [--steps 30]

Checks `--before` out into a temporary git worktree and runs, there and here, with the same
interpreter and data, each in a fresh model cache (so that neither reuses the other's cached
activations or start state):

* the main job (`python -m simulation.launch`, the demo's settings from each checkout's
  pyproject.toml, `--rounds` rounds);
* a short centralized run (`mops train --steps N --eval-samples 32`, the defaults otherwise).

It prints the per-round test perplexities, the centralized training losses and test perplexities
and the SHA-256 of each checkpoint's tensors side by side, and exits 1 if any differs. The
checkpoints' JSON configs are not compared: they list the settings, which a refactoring may rename
or remove.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.launch import PROJECT, with_shared_data  # noqa: E402


def run_both_jobs(checkout: Path, work: Path, rounds: int, steps: int) -> dict:
    env = {**with_shared_data(os.environ), "HF_HUB_OFFLINE": "1"}  # a worktree has no ../shared beside it
    started = time.perf_counter()
    demo = [sys.executable, "-m", "simulation.launch", "--out-dir", str(work / "demo"), "--flwr-home", str(work / "flwr"),
            "--run-config", f"num-server-rounds={rounds}"]
    subprocess.run(demo, cwd=checkout, env={**env, "MOPS_CACHE_DIR": str(work / "cache-demo")}, check=False)
    central = [sys.executable, "-m", "mops_core.cli", "train", "--steps", str(steps), "--eval-samples", "32",
               "--out", str(work / "central"), "--no-progress"]
    subprocess.run(central, cwd=checkout, env={**env, "MOPS_CACHE_DIR": str(work / "cache-central")}, check=False)
    return {"seconds": time.perf_counter() - started, **read(work)}


def tensors_sha(checkpoint: Path) -> str:
    path = checkpoint / "adapter_model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.exists() else "-"


def read(work: Path) -> dict:
    numbers: dict = {}
    try:
        rounds = json.loads((work / "demo" / "results.json").read_text())["rounds"]
        numbers["main job: perplexity after round"] = {r["round"]: r["perplexity"] for r in rounds}
    except (OSError, ValueError, KeyError):
        numbers["main job: perplexity after round"] = {}
    numbers["main job: checkpoint tensors"] = tensors_sha(work / "demo" / "checkpoint")
    try:
        central = json.loads((work / "central" / "results.json").read_text())
        numbers["centralized: training loss at step"] = dict(enumerate(central["train"]["losses"], 1))
        numbers["centralized: test perplexity"] = {"start": central["before"]["perplexity"], "end": central["after"]["perplexity"]}
    except (OSError, ValueError, KeyError):
        numbers["centralized: training loss at step"] = {}
    numbers["centralized: checkpoint tensors"] = tensors_sha(work / "central" / "checkpoint")
    return numbers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git commit to compare against")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the main job (default 3, the demo's)")
    parser.add_argument("--steps", type=int, default=30, help="steps of the centralized run")
    parser.add_argument("--keep", type=Path, help="keep both runs' outputs here instead of a temporary folder")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mops-same-numbers-") as tmp:
        root = args.keep or Path(tmp)
        worktree = Path(tmp) / "before-checkout"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=PROJECT, check=True)
        try:
            before = run_both_jobs(worktree, root / "before", args.rounds, args.steps)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=PROJECT, check=False)
        after = run_both_jobs(PROJECT, root / "after", args.rounds, args.steps)

    print(f"\nbefore = {args.before}, after = this checkout ({before['seconds']:.0f} s and {after['seconds']:.0f} s)")
    same = True
    for name in before:
        if name == "seconds":
            continue
        b, a = before[name], after[name]
        equal = b == a and b not in ({}, "-")
        same &= equal
        print(f"{'same' if equal else 'DIFFERENT':9s} {name}")
        for key in (b if isinstance(b, dict) else {"": b}):
            left = b[key] if isinstance(b, dict) else b
            right = a.get(key, "-") if isinstance(a, dict) else a
            print(f"          {str(key):>6s}  {left!s:>22s}  {right!s:>22s}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
