"""How far a bfloat16 base moves the numbers from float32: test perplexity and training losses, side by side.

    python benchmarks/bf16_accuracy.py [--compression sparsegpt:0.75] [--samples 32] [--steps 5]

One compressed SmolLM2 and one MoPs start state (P1, prompts, gate: prepared in float32, or
read from the start-state cache) serve both runs; the bfloat16 run casts that same base to
bfloat16 and loads that same start state, so the only difference is the base's dtype
(trainable tensors stay float32 either way, as `dtype = "bfloat16"` runs them). Printed per
pair with its relative difference: the plain base's test perplexity, MoPs' test perplexity at
the start, the loss of each of `--steps` training steps on the same batches, and the test
perplexity after them.

bfloat16 arithmetic on a CPU without AVX-512 bf16 or AMX is emulated and slow (tens of seconds
a step), but it computes the same numbers native hardware does, so a tolerance measured on such a
machine holds elsewhere; keep --samples and --steps small there.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core import checkpoint  # noqa: E402
from mops_core.centralized import evaluate_plain_base  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.session import Session, build_model  # noqa: E402
from mops_core.start_state import prepare_or_load, start_state_dir  # noqa: E402


def measure(session: Session, steps: int, label: str) -> dict[str, float]:
    settings, data = session.settings, session.data
    plain = evaluate_plain_base(session.base, session.tokenizer, data, settings, progress=True, desc=f"{label} base")
    numbers = {"base test ppl": plain.perplexity}
    numbers["MoPs start test ppl"] = session.evaluate(progress=True, desc=f"{label} start").perplexity
    stats = session.train(data.train, steps, seed=settings.train.seed, progress=True, desc=f"{label} train")
    numbers.update({f"loss, step {i + 1}": loss for i, loss in enumerate(stats.losses)})
    numbers[f"MoPs test ppl after {steps} steps"] = session.evaluate(progress=True, desc=f"{label} end").perplexity
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
    session = Session.open(settings)
    key, _ = prepare_or_load(session)
    fp32 = measure(session, args.steps, "float32")

    # The same compressed weights in bfloat16 (the base stayed frozen), the same start state (read
    # back: training moved the float32 model's); the base check passes because the fingerprint ignores dtype.
    bf16_base = copy.deepcopy(session.base).to(torch.bfloat16)
    bf16_settings = session.settings.replace(dtype="bfloat16")
    bf16_session = Session(bf16_settings, bf16_base, session.tokenizer, build_model(bf16_settings, bf16_base, session.tokenizer), None, session.tasks)
    bf16_session.data = session.data
    checkpoint.load_into(checkpoint.read(start_state_dir(settings, key)), bf16_session.model)
    bf16 = measure(bf16_session, args.steps, "bfloat16")

    print(f"\nSmolLM2, {args.compression}, {args.samples} test samples, start state {key}")
    print(f"{'quantity':34s} {'float32':>10s} {'bfloat16':>10s} {'relative':>9s}")
    for name in fp32:
        print(f"{name:34s} {fp32[name]:10.4f} {bf16[name]:10.4f} {(bf16[name] - fp32[name]) / fp32[name]:+9.2%}")


if __name__ == "__main__":
    main()
