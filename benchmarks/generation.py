"""Generation speed: a tuned MoPs checkpoint against its plain base, side by side.

    python benchmarks/generation.py runs/c300-mops/checkpoint [--questions 8] [--new-tokens 64]

Both decode greedily with transformers' generate and its KV cache, exactly `--new-tokens`
tokens per question (min = max, so answers of different lengths do not skew the rate), on
the same test questions, interleaved (base, tuned, base, tuned, ...). The tuned model's prompt
is longer by the K prompt positions and pays for the gate and the hooks; the ratio says what
that costs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core.generate import Generator  # noqa: E402
from mops_core.session import Session  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    session, _ = Session.from_checkpoint(args.checkpoint)
    model, tokenizer, formatter = session.model, session.tokenizer, session.formatter
    generator = Generator(model, formatter, tokenizer.eos_token_id, session.pad_id)
    records = session.data.test_records[: args.questions]
    n = args.new_tokens

    def plain(record) -> None:
        ids = [model.sink_token_id] + formatter.question_ids(record.instruction, record.context)
        with torch.no_grad():
            model.base.generate(torch.tensor([ids], device=model.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                pad_token_id=session.pad_id)

    def tuned(record) -> None:
        generator.answer(record.instruction, record.context, max_new_tokens=n, min_new_tokens=n)

    plain(records[0])  # warm-up
    tuned(records[0])
    rates: dict[str, list[float]] = {"plain base": [], "MoPs (tuned)": []}
    for record in records:
        for name, run in (("plain base", plain), ("MoPs (tuned)", tuned)):
            start = time.perf_counter()
            run(record)
            rates[name].append(n / (time.perf_counter() - start))
    base_rate = statistics.median(rates["plain base"])
    print(f"\nGreedy generation, {n} new tokens per question, {len(records)} test questions, median tokens/s")
    for name, values in rates.items():
        print(f"{name:14s} {statistics.median(values):7.1f} tok/s   ({statistics.median(values) / base_rate:.2f}x the plain base)")


if __name__ == "__main__":
    main()
