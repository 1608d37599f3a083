"""Evaluation throughput: MoPs' `evaluate` (no grad, batched, every layer) against the plain base.

    python benchmarks/eval_speed.py [--samples 64] [--batch-size 8] [--repeats 3] [--dtypes float32 bfloat16] [--device cuda]

On SmolLM2 with 7 experts x 10 prompts and random token samples of 64 to 320 tokens (half of
each a question, half a labelled response), both in each dtype asked:
  mops evaluate          mops_core.evaluate.evaluate, no activation cache: all 30 layers, the gate, the loss
  mops evaluate, eager   the same with the decoder layers eager (`compile = false`)
  mops evaluate, cached  the same with the activation cache warm: how a run evaluates its test split
                         after the first time (the states entering L_int are reused; the layers above run)
  base forward           transformers' own forward of the plain base on the same padded batches (no prompts)
Runs are interleaved; medians are printed as text tokens per second and as a ratio to the base.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core.activations import ActivationCache, tokenizer_identity  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.data import Example, collate  # noqa: E402
from mops_core.evaluate import evaluate  # noqa: E402
from mops_core.loading import load_base  # noqa: E402
from mops_core.session import build_model  # noqa: E402
from mops_core.train import init_input_prompts  # noqa: E402


def random_examples(count: int, vocab: int, seed: int = 0) -> list[Example]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(64, 321, (count,), generator=generator).tolist()
    return [Example(tuple(torch.randint(10, vocab, (n,), generator=generator).tolist()), n // 2, 0) for n in lengths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2", help="the base: the embedded SmolLM2, a local checkpoint or a hub "
                        "id; a checkpoint of random weights times a model's shape without its download")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the base and the evaluations run")
    args = parser.parse_args()

    runs = {}
    tokens = 0
    for dtype in args.dtypes:
        settings = Settings.from_flat({"model": args.model, "dtype": dtype, "device": args.device, "experts": 7})
        base, tokenizer = load_base(settings.model)
        model = build_model(settings, base, tokenizer)
        init_input_prompts(model, torch.Generator().manual_seed(0))
        model.init_prompts_from_input()
        examples = random_examples(args.samples, base.config.vocab_size)
        tokens = sum(len(e.input_ids) for e in examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        by_length = sorted(examples, key=lambda e: len(e.input_ids))  # as evaluate batches them: the same padding
        batches = [{k: v.to(base.device) for k, v in collate(by_length[i : i + args.batch_size], pad).items()}
                   for i in range(0, len(examples), args.batch_size)]
        cache = ActivationCache(model, tokenizer_identity(tokenizer), directory=None, memory_mb=1024, disk_mb=0)

        def base_forward(base=base, batches=batches, sink=tokenizer.bos_token_id):
            with torch.no_grad():
                for batch in batches:
                    ids, mask = batch["input_ids"], batch["attention_mask"]
                    ones = torch.ones(ids.shape[0], 1, dtype=ids.dtype, device=ids.device)
                    logits = base(input_ids=torch.cat([ones * sink, ids], 1), attention_mask=torch.cat([ones, mask], 1), logits_to_keep=1).logits
                logits.cpu()  # a GPU runs asynchronously: wait for the last batch, as evaluate does for each

        def mops_evaluate(model=model, examples=examples, pad=pad, cache=None, compile=True):
            model.compile_layers = compile
            evaluate(model, examples, ["task"], pad_id=pad, batch_size=args.batch_size, cache=cache, progress=False)

        runs[f"mops evaluate ({dtype})"] = mops_evaluate
        runs[f"mops evaluate, eager ({dtype})"] = lambda run=mops_evaluate: run(compile=False)
        runs[f"mops evaluate, cached ({dtype})"] = lambda run=mops_evaluate, cache=cache: run(cache=cache)  # warm-up fills it
        runs[f"base forward ({dtype})"] = base_forward

    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    where = torch.cuda.get_device_name(args.device) if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n{args.model} on {args.device}, {args.samples} samples of 64-320 tokens ({tokens} text tokens), batch {args.batch_size}, "
          f"{where}, median of {args.repeats} interleaved runs")
    print(f"{'run':36s} {'s':>7s} {'text tokens/s':>14s} {'vs base forward':>16s}")
    for name, values in times.items():
        median = statistics.median(values)
        dtype = name[name.index("(") :]
        reference = statistics.median(times[f"base forward {dtype}"])
        print(f"{name:36s} {median:7.2f} {tokens / median:14.0f} {median / reference:15.2f}x")


if __name__ == "__main__":
    main()
