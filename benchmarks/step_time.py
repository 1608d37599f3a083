"""One training step of MoPs against prompt tuning at the input, measured side by side.

    python benchmarks/step_time.py [--seq 256] [--repeats 7] [--inject-layer 9] [--dtype float32]

Three steps (forward, backward, AdamW) on the same SmolLM2 and the same 256-token sample:
  mops            70 prompts injected at `inject_layer`, gate, no back-propagation below it
  input prompts   the same 70 prompts at the input, back-propagated through every layer
  peft prompt     PEFT prompt tuning with 70 virtual tokens, as a user runs it by default
Runs are interleaved (A B C A B C ...) so that drifts in machine speed hit all alike; the
medians and their ratios to PEFT prompt tuning are printed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core.centralized import build_model  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.loading import load_base  # noqa: E402
from mops_core.train import make_optimizer  # noqa: E402


def sample_batch(vocab: int, seq: int, question: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (1, seq), generator=generator)
    labels = ids.clone()
    labels[:, :question] = -100
    question_mask = torch.zeros(1, seq, dtype=torch.bool)
    question_mask[:, :question] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "question_mask": question_mask, "labels": labels}


def mops_step(settings: Settings, base, tokenizer, batch):
    model = build_model(settings, base, tokenizer)
    model.init_input_prompts(torch.Generator().manual_seed(0))
    model.init_prompts_from_input()
    optimizer = make_optimizer(model.trainable_parameters(), 1e-3)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def input_prompt_step(settings: Settings, base, tokenizer, batch):
    model = build_model(settings, base, tokenizer)
    model.init_input_prompts(torch.Generator().manual_seed(0))
    model.input_prompts.requires_grad_(True)
    optimizer = make_optimizer([model.input_prompts], 1e-3)

    def step():
        model(**batch, inject=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peft_prompt_step(base, num_tokens: int, batch):
    from peft import PromptTuningConfig, TaskType, get_peft_model

    model = get_peft_model(base, PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_tokens))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--question", type=int, default=128, help="leading tokens without labels")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--inject-layer", type=int, default=9)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2")
    args = parser.parse_args()

    settings = Settings.from_flat({"model": args.model, "dtype": args.dtype, "inject-layer": args.inject_layer})
    base, tokenizer = load_base(settings.model)
    batch = {k: v.to(base.device) for k, v in sample_batch(base.config.vocab_size, args.seq, args.question).items()}
    k = settings.mops.num_prompts
    peft_step, peft_model = peft_prompt_step(base, k, batch)
    steps = {
        f"mops (L_int={args.inject_layer})": mops_step(settings, base, tokenizer, batch),
        "input prompts, full backprop": input_prompt_step(settings, base, tokenizer, batch),
        f"peft prompt tuning ({k} tokens)": peft_step,
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    reference = statistics.median(times[f"peft prompt tuning ({k} tokens)"])
    print(f"\nSmolLM2 step time, seq {args.seq} (+{k} prompts), batch 1, {args.dtype}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'method':36s} {'s/step':>8s} {'min':>8s} {'vs PEFT prompt':>15s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:36s} {median:8.3f} {min(values):8.3f} {median / reference:14.2f}x")
    del peft_model


if __name__ == "__main__":
    main()
