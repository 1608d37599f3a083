"""Test perplexity of the compressed base (no prompts) for each pruner and ratio, in one table.

    python benchmarks/compression.py [--ratios 0.5 2:4 0.75 0.85 0.9] [--methods magnitude wanda sparsegpt] \
        [--int8] [--eval-samples 0] [--dataset dolly] [--out runs/bench-compression]

Every cell loads the same base, compresses it (or loads it from the compression cache; the
time shown is the time it took to compute) and evaluates response-token perplexity on the same
test samples. Expected shape (SparseGPT and Wanda papers): SparseGPT <= Wanda << magnitude,
the gap widening with sparsity.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core import atomic  # noqa: E402
from mops_core.centralized import evaluate_plain_base  # noqa: E402
from mops_core.compression.pipeline import compress_base  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.data import prepare  # noqa: E402
from mops_core.loading import load_base  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", nargs="+", default=["0.5", "2:4", "0.75"])
    parser.add_argument("--methods", nargs="+", default=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--int8", action="store_true", help="add an int8 cell")
    parser.add_argument("--eval-samples", type=int, default=0, help="test samples (0 = the whole split)")
    parser.add_argument("--dataset", default="dolly")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="runs/bench-compression")
    args = parser.parse_args()

    base_settings = Settings.from_flat({"model": args.model, "dataset": args.dataset, "eval-samples": args.eval_samples})
    model, tokenizer = load_base(base_settings.model)
    data = prepare(base_settings.data, tokenizer)
    dense = evaluate_plain_base(model, tokenizer, data, base_settings, progress=True, desc="dense")
    rows = [{"compression": "none", "perplexity": dense.perplexity, "sparsity": 0.0, "seconds": 0.0}]
    print(f"dense: perplexity {dense.perplexity:.3f} on {dense.samples} test samples", flush=True)

    cells = [f"{m}:{r}" for r in args.ratios for m in args.methods] + (["int8"] if args.int8 else [])
    for compression in cells:
        settings = base_settings.replace(compression=compression)
        model, tokenizer = load_base(settings.model)
        report = compress_base(model, tokenizer, settings, progress=True)
        result = evaluate_plain_base(model, tokenizer, data, settings, progress=True, desc=compression)
        rows.append({"compression": compression, "perplexity": result.perplexity, "sparsity": report.sparsity, "seconds": report.seconds})
        print(f"{compression}: perplexity {result.perplexity:.3f}, sparsity {report.sparsity:.4f}, {report.seconds:.1f} s", flush=True)
        atomic.write_json(Path(args.out) / "compression.json", {"samples": dense.samples, "rows": rows})

    by = {r["compression"]: r for r in rows}
    print(f"\nTest perplexity of the compressed {args.model} ({args.dataset}, {dense.samples} samples; dense {dense.perplexity:.3f})")
    print(f"{'ratio':>8} " + " ".join(f"{m:>22}" for m in args.methods))
    for ratio in args.ratios:
        cells = []
        for method in args.methods:
            row = by[f"{method}:{ratio}"]
            cells.append(f"{row['perplexity']:>11.2f} ({row['seconds']:>5.0f} s)")
        print(f"{ratio:>8} " + " ".join(f"{c:>22}" for c in cells))
    if args.int8:
        print(f"{'int8':>8} {by['int8']['perplexity']:>11.2f} ({by['int8']['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
