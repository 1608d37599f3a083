"""Held-out routing accuracy of gate pretraining: which input, how deep, how many instructions.

    python benchmarks/gate_routing.py [--dataset dolly] [--compression sparsegpt:0.75] [--seed 0] \
        [--inputs question last prompts+question] [--layers 0 12 18] [--samples 512 2048 0] \
        [--norms rms] [--steps 200 1000] [--out runs/bench-gate-routing]

Which gate input separates the tasks best decides how well MoPs can route. It is read the way MoPs uses the
gate: the same frozen (compressed) base and pretrained input prompts P1 as a run with these
settings, the gate's input computed for every training and test instruction, a fresh gate
fitted on `samples` training instructions (0 = all of them) for `steps` minibatch steps, and the
share of test instructions whose top expert is their task's. `--layers 0` is the injection
layer the settings give; other values read the same input after that many layers (a deeper
`inject-layer`). `--norms` compares the `gate-input-norm` settings, what the gate does to its
input first (`standardise` takes its statistics from the instructions of each fit, as gate
pretraining does). One pass through the deepest layer asked for gives
every (input, layer)'s features; every fit after that is cheap.
Prints a table and writes `routing.json` and `routing.png` under `--out`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mops_core import atomic  # noqa: E402
from mops_core.session import build_model  # noqa: E402
from mops_core.compression.pipeline import prepare_base  # noqa: E402
from mops_core.config import Settings  # noqa: E402
from mops_core.data import pad_token_id, prepare, run_tasks  # noqa: E402
from mops_core.model import MoPsModel  # noqa: E402
from mops_core.labels import expert_targets  # noqa: E402
from mops_core.train import fit_gate, pretrain_input_prompts, question_batches  # noqa: E402


@torch.no_grad()
def features(model: MoPsModel, readers: dict[str, MoPsModel], examples, depths: list[int], *, pad_id: int, batch_size: int):
    """{(input, depth): (N, d)}: each reader's gate input taken from the states entering each depth, in one pass.

    `model` runs the layers (its P1 is the run's); a reader only says which positions the gate reads.
    """
    entering: dict[int, torch.Tensor] = {}
    hooks = [
        model.base.model.layers[d - 1].register_forward_hook(lambda _m, _i, out, d=d: entering.__setitem__(d, out))
        for d in depths
    ]
    feats = {(name, d): torch.empty(len(examples), model.width) for name in readers for d in depths}
    try:
        for rows, batch in question_batches(examples, pad_id=pad_id, batch_size=batch_size, progress=True):
            batch = {k: v.to(model.device) for k, v in batch.items()}
            question = batch["question_mask"]
            model.run_layers(model.embed(batch["input_ids"]), model.key_bias(batch["attention_mask"]), 0, max(depths))
            for name, reader in readers.items():
                for d in depths:
                    feats[name, d][rows] = reader.gate_input(entering[d], question).cpu()
    finally:
        for hook in hooks:
            hook.remove()
    return feats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="dolly")
    parser.add_argument("--compression", default="sparsegpt:0.75")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--inputs", nargs="+", default=["question", "last", "prompts+question"])
    parser.add_argument("--layers", nargs="+", type=int, default=[0], help="0 = the settings' injection layer")
    parser.add_argument("--samples", nargs="+", type=int, default=[512, 2048, 0], help="0 = every training instruction")
    parser.add_argument("--steps", nargs="+", type=int, default=[200, 1000])
    parser.add_argument("--norms", nargs="+", default=["rms"], choices=["rms", "none", "standardise"])
    parser.add_argument("--out", default="runs/bench-gate-routing")
    args = parser.parse_args()

    settings = Settings.from_flat({
        "model": args.model, "dataset": args.dataset, "compression": args.compression, "seed": args.seed,
        "activation-cache": False,
    })
    settings = settings.for_tasks(run_tasks(settings.data))  # one expert per task
    base, tokenizer = prepare_base(settings, progress=True)
    data = prepare(settings.data, tokenizer)
    pad_id = pad_token_id(tokenizer)
    train = [ex for ex in data.train if ex.task_id >= 0]
    test = [ex for ex in data.test if ex.task_id >= 0]
    model = build_model(settings, base, tokenizer)
    pretrain_input_prompts(model, data.train, settings.train, pad_id=pad_id, progress=True)
    inject = model.inject_layer
    print(f"{args.dataset} at {args.compression}: {len(train)} training / {len(test)} test instructions, "
          f"{len(data.tasks)} tasks, injection layer {inject}", flush=True)

    readers = {name: build_model(settings.replace(gate_input=name), base, tokenizer) for name in args.inputs}
    depths = sorted({layer or inject for layer in args.layers})
    started = time.perf_counter()
    chosen = [train[i] for i in torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))]
    if 0 not in args.samples:  # features only for as many instructions as the largest fit uses
        chosen = chosen[: max(args.samples)]
    batch = settings.train.eval_batch_size
    train_feats = features(model, readers, chosen, depths, pad_id=pad_id, batch_size=batch)
    test_feats = features(model, readers, test, depths, pad_id=pad_id, batch_size=batch)
    print(f"features of {len(chosen) + len(test)} instructions at layers {depths}: {time.perf_counter() - started:.0f} s", flush=True)
    train_targets = expert_targets(torch.tensor([ex.task_id for ex in chosen]), model.experts)
    test_targets = expert_targets(torch.tensor([ex.task_id for ex in test]), model.experts)

    rows = []
    for (name, depth), feats in train_feats.items():
        for norm in args.norms:
            probe = build_model(settings.replace(gate_input=name, gate_input_norm=norm), base, tokenizer)
            start_gate = {k: v.clone() for k, v in probe.gate.state_dict().items()}
            for samples in args.samples:
                n = min(samples or len(chosen), len(chosen))
                for steps in args.steps:
                    probe.gate.load_state_dict(start_gate)
                    probe.gate.fit_input_statistics(feats[:n])  # as gate pretraining does
                    fitted = fit_gate(probe, feats[:n], train_targets[:n], steps=steps, lr=settings.train.gate_pretrain_lr, seed=args.seed)
                    with torch.no_grad():
                        held_out = (probe.gate.logits(test_feats[name, depth]).argmax(-1).cpu() == test_targets).float().mean().item()
                    rows.append({
                        "input": name, "norm": norm, "layer": depth, "samples": n, "steps": steps,
                        "train_accuracy": fitted, "routing_accuracy": held_out,
                    })
                    print(f"input {name:>16}  norm {norm:>11}  layer {depth:>2}  samples {n:>5}  steps {steps:>5}  "
                          f"train {fitted:.3f}  held-out {held_out:.3f}", flush=True)
                    atomic.write_json(Path(args.out) / "routing.json", {"settings": vars(args), "test": len(test), "rows": rows})

    print(f"\nHeld-out routing accuracy ({len(test)} test instructions; chance {1 / len(data.tasks):.3f})")
    print("| input | norm | layer | samples | steps | train | held-out |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['input']} | {r['norm']} | {r['layer']} | {r['samples']} | {r['steps']} | {r['train_accuracy']:.3f} | {r['routing_accuracy']:.3f} |")
    plot(rows, Path(args.out) / "routing.png")


def plot(rows: list[dict], path: Path) -> None:
    """One panel per gate input (and norm): accuracy against depth, a line per (instructions, steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inputs = list(dict.fromkeys((r["input"], r.get("norm", "rms")) for r in rows))
    fits = sorted({(r["samples"], r["steps"]) for r in rows})
    fig, axes = plt.subplots(1, len(inputs), figsize=(3.2 * len(inputs) + 1.6, 3.4), sharey=True, squeeze=False)
    for ax, (name, norm) in zip(axes[0], inputs):
        for i, (samples, steps) in enumerate(fits):
            series = sorted((r["layer"], r["routing_accuracy"]) for r in rows
                            if (r["input"], r.get("norm", "rms"), r["samples"], r["steps"]) == (name, norm, samples, steps))
            ax.plot(*zip(*series), marker="o", color=f"C{i}", label=f"{samples} instructions, {steps} steps")
        ax.set_title(f"gate input: {name}, {norm}", fontsize=9)
        ax.set_xlabel("layer read")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out routing accuracy")
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
