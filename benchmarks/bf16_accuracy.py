"""How far a bfloat16 base moves the numbers from float32: test perplexity and the training loss, side by side.

    python benchmarks/bf16_accuracy.py [--samples 128] [--steps 30]

The same SmolLM2, data, seed and start state in both dtypes (trainable tensors stay float32
either way): the plain base's test perplexity, MoPs' test perplexity at its start, and the
mean loss of a short MoPs training run. Prints each pair and its relative difference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core.centralized import build_model, evaluate_plain_base, evaluate_test, prepare_start_state  # noqa: E402
from mops_core.compression.pipeline import prepare_base  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.data import pad_token_id, prepare  # noqa: E402
from mops_core.train import make_mops_optimizer, train_steps  # noqa: E402


def measure(dtype: str, samples: int, steps: int) -> dict[str, float]:
    settings = Settings.from_flat({"dtype": dtype, "eval-samples": samples, "activation-cache": False})
    base, tokenizer = prepare_base(settings, progress=False)
    data = prepare(settings.data, tokenizer)
    pad = pad_token_id(tokenizer)
    plain = evaluate_plain_base(base, tokenizer, data, settings, progress=True, desc=f"{dtype} base")
    model = build_model(settings, base, tokenizer)
    prepare_start_state(model, data, settings, pad_id=pad, progress=True)
    start = evaluate_test(model, data, settings, pad_id=pad, progress=True, desc=f"{dtype} MoPs start")
    stats = train_steps(model, data.train, steps, make_mops_optimizer(model, settings.train), pad_id=pad, desc=f"{dtype} train")
    return {"base test ppl": plain.perplexity, "MoPs start test ppl": start.perplexity, f"MoPs mean loss, {steps} steps": stats.mean_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=128, help="test samples evaluated")
    parser.add_argument("--steps", type=int, default=30, help="MoPs training steps")
    args = parser.parse_args()
    fp32 = measure("float32", args.samples, args.steps)
    bf16 = measure("bfloat16", args.samples, args.steps)
    print(f"\n{'quantity':34s} {'float32':>10s} {'bfloat16':>10s} {'relative':>9s}")
    for name in fp32:
        print(f"{name:34s} {fp32[name]:10.4f} {bf16[name]:10.4f} {(bf16[name] - fp32[name]) / fp32[name]:+9.2%}")


if __name__ == "__main__":
    main()
