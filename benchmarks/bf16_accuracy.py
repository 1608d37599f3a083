"""How far a bfloat16 base moves the numbers from float32: test perplexity and training losses, side by side.

    python benchmarks/bf16_accuracy.py [--compression sparsegpt:0.75] [--samples 32] [--steps 5]

One compressed SmolLM2 and one MoPs start state (P1, prompts, gate: prepared in float32, or
read from the start-state cache) serve both runs; the bfloat16 run casts that same base to
bfloat16 and loads that same start state, so the only difference is the base's dtype
(trainable tensors stay float32 either way, as `dtype = "bfloat16"` runs them). Printed per
pair with its relative difference: the plain base's test perplexity, MoPs' test perplexity at
the start, the loss of each of `--steps` training steps on the same batches, and the test
perplexity after them.

bfloat16 arithmetic on a CPU without AVX-512 bf16 or AMX is emulated and slow (a MoPs step
about 43 s here), but it computes the same numbers native hardware does, so the tolerance
measured here holds there; keep --samples and --steps small on such a machine.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core import checkpoint  # noqa: E402
from mops_core.centralized import build_model, evaluate_plain_base, evaluate_test  # noqa: E402
from mops_core.compression.pipeline import prepare_base  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.data import pad_token_id, prepare  # noqa: E402
from mops_core.start_state import prepare_or_load, start_state_dir  # noqa: E402
from mops_core.train import make_mops_optimizer, train_steps  # noqa: E402


def measure(model, base, tokenizer, data, settings: Settings, steps: int, label: str) -> dict[str, float]:
    pad = pad_token_id(tokenizer)
    numbers = {"base test ppl": evaluate_plain_base(base, tokenizer, data, settings, progress=True, desc=f"{label} base").perplexity}
    numbers["MoPs start test ppl"] = evaluate_test(model, data, settings, pad_id=pad, progress=True, desc=f"{label} start").perplexity
    stats = train_steps(
        model, data.train, steps, make_mops_optimizer(model, settings.train), pad_id=pad,
        batch_size=settings.train.batch_size, seed=settings.train.seed, desc=f"{label} train",
    )
    numbers.update({f"loss, step {i + 1}": loss for i, loss in enumerate(stats.losses)})
    numbers[f"MoPs test ppl after {steps} steps"] = evaluate_test(model, data, settings, pad_id=pad, progress=True, desc=f"{label} end").perplexity
    return numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compression", default="sparsegpt:0.75", help="the base's compression (cached after the first run)")
    parser.add_argument("--samples", type=int, default=32, help="test samples evaluated")
    parser.add_argument("--steps", type=int, default=5, help="MoPs training steps from the start state")
    args = parser.parse_args()
    settings = Settings.from_flat(
        {"dtype": "float32", "compression": args.compression, "eval-samples": args.samples, "activation-cache": False}
    )
    base, tokenizer = prepare_base(settings, progress=True)
    data = prepare(settings.data, tokenizer)
    model = build_model(settings, base, tokenizer)
    key, _ = prepare_or_load(model, data, settings, pad_id=pad_token_id(tokenizer))
    fp32 = measure(model, base, tokenizer, data, settings, args.steps, "float32")

    # The same compressed weights in bfloat16 (the base stayed frozen), the same start state (read
    # back: training moved `model`'s); the base check passes because the fingerprint ignores dtype.
    bf16_base = copy.deepcopy(base).to(torch.bfloat16)
    bf16_settings = settings.replace(dtype="bfloat16")
    model = build_model(bf16_settings, bf16_base, tokenizer)
    checkpoint.load_into(checkpoint.read(start_state_dir(settings, key)), model)
    bf16 = measure(model, bf16_base, tokenizer, data, bf16_settings, args.steps, "bfloat16")

    print(f"\nSmolLM2, {args.compression}, {args.samples} test samples, start state {key}")
    print(f"{'quantity':34s} {'float32':>10s} {'bfloat16':>10s} {'relative':>9s}")
    for name in fp32:
        print(f"{name:34s} {fp32[name]:10.4f} {bf16[name]:10.4f} {(bf16[name] - fp32[name]) / fp32[name]:+9.2%}")


if __name__ == "__main__":
    main()
