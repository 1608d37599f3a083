"""One training step (forward, backward, AdamW) of MoPs against PEFT, side by side, in one run.

    python benchmarks/step_time.py [--seq 256] [--repeats 5] [--dtypes float32 bfloat16] [--device cuda]

On the same SmolLM2 and the same 256-token sample (half question, half labelled response):
  mops cold       70 prompts injected at L_int = 9, gate; layers below L_int run every step
  mops cached     the same with the activation cache warm (the states entering L_int reused)
  mops cached, eager   the same with the decoder layers eager (`compile = false`)
  input prompts   the same 70 prompts at the input, back-propagated through every layer
  peft prompt     PEFT prompt tuning, 70 virtual tokens    \\
  peft prefix     PEFT prefix tuning, 70 virtual tokens     }  as a user runs them by default
  peft lora       PEFT LoRA r=8 on q_proj, v_proj          /
each in every dtype asked (the base in that dtype; MoPs' trainable tensors stay float32).
Runs are interleaved (A B C ... A B C ...) so that machine drift hits all alike; medians are
printed with ratios to PEFT prompt tuning in float32 and within each dtype, and each row's first
step (which pays torch.compile's compile where the layers are compiled). The MoPs steps'
achieved FLOP/s (FLOPs counted analytically; frozen weights need input gradients only), and PEFT
prompt tuning's, are set against a GEMM of the same dtype and shape measured in the same run; the
last lines give the floor: how fast the cached step would be at the GEMM rate itself, as a ratio
to PEFT. A ratio below the floor takes fewer FLOPs (a higher L_int, shorter sequences), not faster kernels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core.activations import ActivationCache, entering, tokenizer_identity  # noqa: E402
from mops_core.session import build_model  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.loading import load_base  # noqa: E402
from mops_core.train import init_input_prompts, make_optimizer  # noqa: E402


def sample_batch(vocab: int, seq: int, question: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (1, seq), generator=generator)
    labels = ids.clone()
    labels[:, :question] = -100
    question_mask = torch.zeros(1, seq, dtype=torch.bool)
    question_mask[:, :question] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "question_mask": question_mask, "labels": labels}


def step_of(loss_fn: Callable[[], torch.Tensor], params) -> Callable[[], float]:
    optimizer = make_optimizer(params, 1e-3)

    def step() -> float:
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def mops_steps(settings: Settings, base, tokenizer, batch) -> dict[str, Callable[[], float]]:
    cold = build_model(settings, base, tokenizer)
    init_input_prompts(cold, torch.Generator().manual_seed(0))
    cold.init_prompts_from_input()
    cached = build_model(settings, base, tokenizer)
    cached.load_state_dict(cold.state_dict())
    cache = ActivationCache(cached, tokenizer_identity(tokenizer), directory=None, memory_mb=1024, disk_mb=0)
    entering(cached, batch, cache)  # warm the cache: every later step reuses the states entering L_int
    eager = build_model(settings, base, tokenizer)
    eager.load_state_dict(cold.state_dict())
    eager.compile_layers = False
    full = build_model(settings, base, tokenizer)
    full.load_state_dict(cold.state_dict())
    full.input_prompts.requires_grad_(True)
    return {
        "mops cold": step_of(lambda: cold(**batch).loss, cold.trainable_parameters()),
        "mops cached": step_of(lambda: cached(**batch, entering=entering(cached, batch, cache)).loss, cached.trainable_parameters()),
        "mops cached, eager": step_of(lambda: eager(**batch, entering=entering(cached, batch, cache)).loss, eager.trainable_parameters()),
        "input prompts": step_of(lambda: full(**batch, inject=False).loss, [full.input_prompts]),
    }


def peft_steps(base, k: int, batch) -> dict[str, Callable[[], float]]:
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType

    from mops_core.peft_baselines import adapted

    configs = {
        "peft prompt": PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=k),
        "peft prefix": PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=k),
        "peft lora": LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, target_modules=["q_proj", "v_proj"]),
    }
    steps = {}
    for name, config in configs.items():
        model = adapted(copy.deepcopy(base), config)
        inputs = {k2: batch[k2] for k2 in ("input_ids", "attention_mask", "labels")}
        steps[name] = step_of(lambda m=model, i=inputs: m(**i).loss, [p for p in model.parameters() if p.requires_grad])
    return steps


def layer_flops(config, s: int, backward: bool = True, keys: int | None = None) -> float:
    """FLOPs of one decoder layer over `s` positions attending to `keys` (`s` unless a prefix's keys
    lead them), forward and, with `backward`, input gradients (the weights are frozen: backward runs
    each linear once more and attention's two products twice)."""
    d, di = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    linear = 2 * s * (d * d + 2 * d * kv + d * d + 3 * d * di)
    attention = 2 * 2 * s * (s if keys is None else keys) * d
    return 2 * linear + 3 * attention if backward else linear + attention


def mops_flops(config, seq: int, k: int, labelled: int, inject: int, cached: bool) -> float:
    """FLOPs of one MoPs step: the upper layers forward and backward, the head on labelled tokens
    (and, cold, the lower layers forward only, over the text after the sink's and P1's keys)."""
    s = seq + 1 + k
    lower = 0 if cached else inject * layer_flops(config, seq, backward=False, keys=s)
    head = 2 * 2 * labelled * config.hidden_size * config.vocab_size
    return (config.num_hidden_layers - inject) * layer_flops(config, s) + lower + head


def peft_prompt_flops(config, seq: int, k: int) -> float:
    """FLOPs of one PEFT prompt-tuning step: every layer forward and backward down to the virtual
    tokens, the head over every position (transformers computes logits for all of them)."""
    s = seq + k
    return config.num_hidden_layers * layer_flops(config, s) + 2 * 2 * s * config.hidden_size * config.vocab_size


def gemm_rate(dtype: torch.dtype, m: int, n: int, k: int, device: torch.device, repeats: int = 20) -> float:
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)  # a GPU runs the products asynchronously: time them to the end
    return 2 * m * n * k * repeats / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--question", type=int, default=128, help="leading tokens without labels")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--inject-layer", type=int, default=9)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--model", default="smollm2", help="the base: the embedded SmolLM2, a local checkpoint or a hub "
                        "id; a checkpoint of random weights times a model's shape without its download")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the base and every step run")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of 3 cached MoPs steps")
    args = parser.parse_args()

    steps: dict[str, Callable[[], float]] = {}
    flops: dict[str, float] = {}
    config = None
    for dtype in args.dtypes:
        settings = Settings.from_flat({"model": args.model, "dtype": dtype, "device": args.device, "inject-layer": args.inject_layer, "experts": 7})
        base, tokenizer = load_base(settings.model)
        config = base.config
        batch = {k: v.to(base.device) for k, v in sample_batch(config.vocab_size, args.seq, args.question).items()}
        k = settings.mops.num_prompts
        for name, step in {**mops_steps(settings, base, tokenizer, batch), **peft_steps(base, k, batch)}.items():
            steps[f"{name} ({dtype})"] = step
        for name, cached in (("mops cold", False), ("mops cached", True), ("mops cached, eager", True)):
            flops[f"{name} ({dtype})"] = mops_flops(config, args.seq, k, args.seq - args.question, args.inject_layer, cached)
    times: dict[str, list[float]] = {name: [] for name in steps}
    first: dict[str, float] = {}
    for name, step in steps.items():
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        for step in steps.values():
            step()
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    median = {name: statistics.median(values) for name, values in times.items()}
    # The yardstick: PEFT prompt tuning in float32, as a user runs it by default; without float32, in the first dtype.
    short = {"float32": "fp32", "bfloat16": "bf16"}
    against = "float32" if "float32" in args.dtypes else args.dtypes[0]
    reference, against = median[f"peft prompt ({against})"], f"PEFT prompt {short.get(against, against)}"
    where = torch.cuda.get_device_name(args.device) if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"\n{args.model} training step on {args.device}, seq {args.seq} + {k} prompts, batch 1, {where}, "
          f"median of {args.repeats} interleaved runs")
    print(f"{'step':32s} {'s/step':>7s} {'vs ' + against:>20s} {'vs PEFT prompt, same dtype':>27s} "
          f"{'vs LoRA, same dtype':>20s} {'first step s':>13s}")
    for name, value in median.items():
        dtype = name[name.index("(") + 1 : -1]
        same_prompt = median[f"peft prompt ({dtype})"]
        same_lora = median[f"peft lora ({dtype})"]
        print(f"{name:32s} {value:7.3f} {value / reference:19.2f}x {value / same_prompt:26.2f}x {value / same_lora:19.2f}x "
              f"{first[name]:13.1f}")
    d = config.hidden_size
    device = torch.device(args.device)
    rates = {dtype: gemm_rate(getattr(torch, dtype), args.seq + 71, config.intermediate_size, d, device) for dtype in args.dtypes}
    print("\nAchieved FLOP/s against a GEMM of the same dtype (seq x d by d x intermediate), FLOPs counted analytically:")
    for dtype in args.dtypes:
        flops[f"peft prompt ({dtype})"] = peft_prompt_flops(config, args.seq, k)
    for name, count in flops.items():
        rate = rates[name[name.index("(") + 1 : -1]]
        achieved = count / median[name]
        print(f"  {name:26s} {count / 1e9:6.1f} GFLOP  {achieved / 1e9:7.1f} GFLOP/s  = {achieved / rate:5.1%} of {rate / 1e9:.0f} GFLOP/s")
    # The floor: a step at the GEMM rate itself. A ratio to PEFT below this one needs fewer FLOPs, not a faster kernel.
    print("\nThe fastest a cached MoPs step can be on this machine (its FLOPs at 100% of the GEMM rate):")
    for dtype in args.dtypes:
        floor = flops[f"mops cached ({dtype})"] / rates[dtype]
        print(f"  {dtype:9s} {floor:6.3f} s/step = {floor / reference:.2f}x {against}, "
              f"{floor / median[f'peft prompt ({dtype})']:.2f}x PEFT prompt {dtype}; "
              f"FLOPs {flops[f'mops cached ({dtype})'] / flops[f'peft prompt ({dtype})']:.2f}x PEFT prompt's")
    if args.profile:
        for dtype in args.dtypes:
            step = steps[f"mops cached ({dtype})"]
            with torch.profiler.profile() as profile:
                for _ in range(3):
                    step()
            print(f"\nProfile of 3 cached MoPs steps ({dtype}), top operators by own CPU time:")
            print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()
