"""How skewed the clients' task mixtures are under each partitioner and alpha, and which splits exist.

    python benchmarks/partition_skew.py [--datasets dolly sni] [--alphas 0.1 0.5 10] [--clients 100]

For every dataset, partitioner and alpha: whether flwr-datasets finds a split of the run's training
samples over `--clients` clients (at the default min-partition-size for 'dirichlet'), the smallest
and largest client, and the mean share of each client's commonest task (1 = one task per client;
1 / tasks = every client mixed evenly).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.node import dirichlet_split, train_records  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.data import run_tasks  # noqa: E402
from simulation.launch import with_shared_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["dolly", "sni"])
    parser.add_argument("--alphas", nargs="+", type=float, default=[0.1, 0.5, 10.0])
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    os.environ.update(with_shared_data(os.environ))
    warnings.filterwarnings("ignore")

    print(f"{'data':8s} {'partitioner':16s} {'alpha':>6s} {'samples':>8s} {'smallest':>9s} {'largest':>8s} {'commonest task':>15s}")
    for dataset in args.datasets:
        settings = Settings.from_flat({"dataset": dataset})
        records, tasks = train_records(settings.data), run_tasks(settings.data)
        for partitioner in ("dirichlet", "inner-dirichlet"):
            for alpha in args.alphas:
                row = f"{dataset:8s} {partitioner:16s} {alpha:6g} {len(records):8d}"
                try:
                    parts = dirichlet_split(settings.data, args.clients, alpha, settings.federated.min_partition_size, partitioner)
                except ValueError:
                    print(f"{row} {'no split':>9s}")
                    continue
                shares = [max(sum(records[i].task == t for i in part) for t in tasks) / len(part) for part in parts]
                sizes = [len(part) for part in parts]
                print(f"{row} {min(sizes):9d} {max(sizes):8d} {sum(shares) / len(shares):15.2f}")


if __name__ == "__main__":
    main()
