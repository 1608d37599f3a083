"""Clients' local training with the decoder layers compiled and eager, alternating in one process.

    python benchmarks/client_steps.py [--clients 10] [--steps 10] [--passes 2]

What a round of the default main job asks of the clients, on the demo's settings (SmolLM2, Dolly,
dtype auto): `--clients` clients each train `--steps` steps from a fresh optimizer on 20 of the
training samples (a client's share), through `Session.train` as the ClientApp calls it. A first
eager pass fills the activation cache (not counted); the first compiled pass pays the compile
(disk cache as found); then compiled and eager passes alternate, so that machine drift hits both.
Prints each pass's seconds and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core.config import Settings  # noqa: E402
from mops_core.session import Session  # noqa: E402
from simulation.launch import with_shared_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--passes", type=int, default=2, help="timed passes of each kind")
    args = parser.parse_args()
    os.environ.update(with_shared_data(os.environ))

    session = Session.open(Settings.from_flat({"compile": True, "activation-cache-disk-mb": 0}), progress=False)
    train = list(session.data.train)
    shares = [random.Random(c).sample(train, 20) for c in range(args.clients)]

    def one_pass(compiled: bool) -> float:
        session.model.compile_layers = compiled
        started = time.perf_counter()
        for client, examples in enumerate(shares):
            session.train(examples, args.steps, seed=client)
        return time.perf_counter() - started

    warm = one_pass(False)
    first = one_pass(True)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.passes):
        for compiled in (False, True):
            times[compiled].append(one_pass(compiled))
    steps = args.clients * args.steps
    print(f"\n{args.clients} clients x {args.steps} steps, {session.settings.model.dtype} base "
          f"({session.model.dtype}), {os.cpu_count()} CPUs")
    print(f"  eager, activation cache cold (not counted)   {warm:7.1f} s")
    print(f"  compiled, first pass (pays the compile)      {first:7.1f} s")
    for compiled in (False, True):
        label = "compiled" if compiled else "eager"
        print(f"  {label:9s} passes {', '.join(f'{t:.1f}' for t in times[compiled]):28s} s  "
              f"({statistics.median(times[compiled]) / steps:.3f} s/step)")
    print(f"  compiled / eager: {statistics.median(times[True]) / statistics.median(times[False]):.2f}x")


if __name__ == "__main__":
    main()
