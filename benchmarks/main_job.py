"""Wall time of the default federated main job: this checkout against an earlier commit.

    python benchmarks/main_job.py --before 3316f70 [--rounds 3] [--repeats 1] [--order after,before]
    python benchmarks/main_job.py --before HEAD --before-args "--client-cpus 2"   # one launcher option against the default
    python benchmarks/main_job.py --before HEAD --before-args "--run-config 'tracking=\"none\"'"   # a setting: TOML quotes inside

Checks out `--before` into a temporary git worktree and runs the same main job there and here
(`python -m simulation.launch` with the demo's settings from each checkout's pyproject.toml, the
same interpreter, the same data and model cache), one after the other, each in its own Flower
home and results folder. It prints each run's wall time, the seconds of each round as its
results.json recorded them, and the ratios: of the wall times, and of the median round. A shared
machine's speed drifts by more than a speed-up between runs minutes apart: `--repeats N` runs
each checkout N times, reversing the order every repeat (after, before, before, after, ...),
and takes medians over them. `--before-args` are launcher options for the "before" runs alone
(`python -m simulation.launch --help`): with `--before HEAD` they measure one option of the same code.

Every run samples the same clients and the same local samples, so the activation cache on disk
would serve a checkout's second run (and any run of a commit benchmarked before) every state
below `L_int`: the runs keep activations in memory only (`activation-cache-disk-mb=0`), and each
client's first visit of a sample is cold, as on a fresh machine. What they still share is the
dequantised base and the start state in the model cache, and inductor's compiled code: run a
demo once beforehand so that none pays for dequantising.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.launch import PROJECT, with_shared_data  # noqa: E402


def run_main_job(checkout: Path, work: Path, rounds: int | None, extra: tuple[str, ...] = ()) -> dict:
    out = work / "results"
    command = [sys.executable, "-m", "simulation.launch", "--out-dir", str(out), "--flwr-home", str(work / "flwr"),
               "--run-config", "activation-cache-disk-mb=0", *extra]  # no run warm from an earlier one's activations
    if rounds:
        command += ["--run-config", f"num-server-rounds={rounds}"]
    started = time.perf_counter()
    code = subprocess.run(command, cwd=checkout, env=with_shared_data(os.environ)).returncode  # the worktree has no ../shared
    wall = time.perf_counter() - started
    try:
        history = json.loads((out / "results.json").read_text()).get("rounds") or []
    except (OSError, ValueError):
        history = []
    if code == 0 and not history:  # `flwr run` exits 0 after a ServerApp error
        code = 1
    return {"code": code, "wall": wall, "rounds": history}


def round_seconds(history: list[dict]) -> list[float]:
    """Each training round's seconds (sampling, client training, aggregation), as the server logged them."""
    return [float(r.get("seconds", float("nan"))) for r in history if r.get("round", 0) > 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git commit to compare against (e.g. the one before a speed-up)")
    parser.add_argument("--rounds", type=int, help="num-server-rounds for both (default: each pyproject's)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each checkout, the order reversed every repeat")
    parser.add_argument("--order", default="after,before", help="which runs first (the first may warm the OS file cache)")
    parser.add_argument("--before-args", default="", help="launcher options of the before runs, e.g. \"--client-cpus 2\"")
    args = parser.parse_args()
    before_args = shlex.split(args.before_args)
    order = args.order.split(",")
    if sorted(order) != ["after", "before"] or args.repeats < 1:
        parser.error("--order is after,before or before,after; --repeats at least 1")

    results: dict[str, list[dict]] = {"after": [], "before": []}
    with tempfile.TemporaryDirectory(prefix="mops-main-job-") as tmp:
        tmp_path = Path(tmp)
        worktree = tmp_path / "before-checkout"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.before], cwd=PROJECT, check=True)
        try:
            plan = [(repeat, name) for repeat in range(args.repeats) for name in (order if repeat % 2 == 0 else order[::-1])]
            for repeat, name in plan:
                checkout = PROJECT if name == "after" else worktree
                print(f"--- {name}, run {repeat + 1}/{args.repeats}: {checkout} ---", flush=True)
                extra = tuple(before_args) if name == "before" else ()
                results[name].append(run_main_job(checkout, tmp_path / f"{name}-{repeat}", args.rounds, extra))
                if results[name][-1]["code"] != 0:  # no ratio can come of it: say so now, not after the other runs
                    print(f"--- {name} run {repeat + 1} failed (exit {results[name][-1]['code']}); its output is above ---")
                    break
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=PROJECT, check=False)

    print(f"\nmain job, before = {args.before}{' ' + shlex.join(before_args) if before_args else ''}, after = this checkout")
    for name, runs in results.items():
        for result in runs:
            last = result["rounds"][-1] if result["rounds"] else {}
            per_round = ", ".join(f"{s:.1f}" for s in round_seconds(result["rounds"]))
            print(f"  {name:6s} exit {result['code']}  wall {result['wall']:7.1f} s  rounds [{per_round}] s  "
                  f"last round {last.get('round', '-')}, ppl {last.get('perplexity', '-')}")
    ok = all(r["code"] == 0 for runs in results.values() for r in runs)
    if ok:
        wall = {name: statistics.median(r["wall"] for r in runs) for name, runs in results.items()}
        rounds = {name: statistics.median(s for r in runs for s in round_seconds(r["rounds"])) for name, runs in results.items()}
        print(f"  median wall: after {wall['after']:.1f} s, before {wall['before']:.1f} s: {wall['after'] / wall['before']:.2f}x")
        print(f"  median round: after {rounds['after']:.1f} s, before {rounds['before']:.1f} s: {rounds['after'] / rounds['before']:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
