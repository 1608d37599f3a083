"""What a benchmark runs: a profile names the grid, `cells` spells it out.

A cell is one training run: centralized (prompt tuning, MoPs, LoRA, IA3) or federated through
the Flower app (FedPrompt, MoPs), on one dataset and one compressed base. The methods compared
in a table row share every setting but the method: seeds, data, split, partitions, steps and
the compressed base (cached once, used by all).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from mops_core.config import ADDED_LATER, NOT_RESULTS, Settings, recorded

CENTRALIZED_METHODS = ("prompt", "mops", "lora", "ia3")
FEDERATED_METHODS = ("fedprompt", "mops")
PEFT_METHODS = ("lora", "ia3")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    model: str
    datasets: tuple[str, ...]
    compressions: tuple[str, ...]
    centralized_methods: tuple[str, ...] = CENTRALIZED_METHODS
    federated_methods: tuple[str, ...] = FEDERATED_METHODS
    common: dict[str, Any] = field(default_factory=dict)  # run-config keys of every cell
    centralized: dict[str, Any] = field(default_factory=dict)
    federated: dict[str, Any] = field(default_factory=dict)
    supernodes: int = 100
    # Figures 2 and 3: centralized MoPs at the first dataset and compression, one setting varied.
    inject_layers: tuple[int, ...] = ()
    prompts_per_expert: tuple[int, ...] = ()
    sweep_baseline: bool = False  # also run prompt tuning at each swept inject-layer
    seeds: tuple[int, ...] = (0,)  # every main cell once per seed (tables show mean and spread)
    dataset_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)  # a dataset's own seeds, where they differ
    dataset_compressions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # a dataset's own bases, where they differ
    variants: dict[str, dict[str, Any]] = field(default_factory=lambda: {"default": {}})  # named setting changes
    # Federated cells that the tables pair (one dataset, base and seed) advance together this many rounds at
    # a time, so that a long grid answers at round N after 2 x N rounds of compute, not after a whole cell
    # and N more; 0 = each cell runs to its last round before the next starts.
    stage_rounds: int = 0


QUICK = Profile(
    name="quick",
    description="SmolLM2 on Dolly, SparseGPT 75% and 2:4, short runs (about an hour on a 2-core CPU)",
    model="smollm2",
    datasets=("dolly",),
    compressions=("sparsegpt:0.75", "sparsegpt:2:4"),
    common={"eval-samples": 64},
    centralized={"steps": 100},
    federated={"num-server-rounds": 2, "local-steps": 10, "fraction-train": 0.1, "min-available-nodes": 100},
    supernodes=100,
    inject_layers=(5, 15),
    prompts_per_expert=(5, 20),
    sweep_baseline=True,  # L_int changes how many layers train for both methods: Fig. 2 compares them at each
)

PAPER = Profile(
    name="paper",
    description="the paper's scale: 20k centralized steps; 20 rounds x 10 of 100 clients x 250 steps (for a GPU)",
    model="meta-llama/Llama-2-7b-hf",
    datasets=("dolly", "sni"),
    compressions=(
        "sparsegpt:0.9", "sparsegpt:0.85", "sparsegpt:0.75",
        "sparsegpt:7:8", "sparsegpt:3:4", "sparsegpt:2:4", "sparsegpt:4:8",
    ),
    common={"eval-samples": 0, "lr": 1e-3, "samples": 5000, "experts": 7, "prompts-per-expert": 10, "inject-layer": 10},
    centralized={"steps": 20000},
    federated={"num-server-rounds": 20, "local-steps": 250, "fraction-train": 0.1, "min-available-nodes": 100},
    supernodes=100,
    inject_layers=(4, 8, 16, 24),
    prompts_per_expert=(1, 5, 20),
    sweep_baseline=True,
)

# The paper's literal choices, spelled out so that the ablation means the same whatever the defaults are.
# P1 from random vocabulary, which the paper leaves open, as these rows were measured before text became the default.
PAPER_GATE = {
    "prompt-lr": 1e-3, "gate-scale": "one", "gate-input": "prompts+question", "gate-balance": 0.0, "input-prompt-init": "vocab",
}

ABLATION = Profile(
    name="ablation",
    description="what makes the mixture pay: centralized prompt tuning against MoPs variants",
    model="smollm2",
    datasets=("dolly",),
    compressions=("sparsegpt:0.75",),
    centralized_methods=("prompt", "mops"),
    federated_methods=(),
    common={"eval-samples": 64},
    centralized={"steps": 100},
    seeds=(0, 1),
    variants={
        "paper (one lr)": PAPER_GATE,
        "prompt lr x RMS": {**PAPER_GATE, "prompt-lr": 0.0},
        "+ balance": {**PAPER_GATE, "prompt-lr": 0.0, "gate-balance": 0.05},
        "+ question input": {**PAPER_GATE, "prompt-lr": 0.0, "gate-input": "question"},
        "+ E g": {**PAPER_GATE, "prompt-lr": 0.0, "gate-scale": "experts"},
        "defaults": {},
        "defaults + gate lr x0.1": {"gate-lr-scale": 0.1},
        "defaults + fixed gate": {"gate-lr-scale": 0.0},
        "defaults + balance 0.5": {"gate-balance": 0.5},
        "defaults + floor 0.1": {"gate-floor": 0.1},
        "defaults + vocab P1": {"input-prompt-init": "vocab"},
        "defaults + standardised gate input": {"gate-input-norm": "standardise"},
        "defaults + standardised gate input + balance 0.5": {"gate-input-norm": "standardise", "gate-balance": 0.5},
    },
)

# The quick profile's federated cells at 75% (its seed-0 runs serve as this profile's defaults), two seeds.
FEDERATED_ABLATION = replace(
    QUICK,
    name="fed-ablation",
    description="federated: FedPrompt vs MoPs with experts averaged by gate or by examples, or a gate floor",
    compressions=("sparsegpt:0.75",),
    centralized_methods=(),
    inject_layers=(),
    prompts_per_expert=(),
    seeds=(0, 1),
    variants={"defaults": {}, "examples-weighted experts": {"expert-aggregation": "examples"}, "floor 0.1": {"gate-floor": 0.1}},
)

# Every heterogeneity cell trains this many client steps in all (rounds x 10 clients x local steps),
# so that long local training buys no extra compute; the grid is sized to about 10 hours on a
# 2-core CPU at the compiled step's speed.
HETEROGENEITY_CLIENT_STEPS = 1000
HETEROGENEITY_CLIENTS_PER_ROUND = 10

HETEROGENEITY = Profile(
    name="heterogeneity",
    description="federated: FedPrompt vs MoPs as the clients' task mixtures grow more skewed (Dirichlet alpha 10, 0.5, 0.1) "
                "and their local training longer (20 or 100 steps), the same client steps in every cell",
    model="smollm2",
    datasets=("sni", "dolly"),
    compressions=("sparsegpt:0.75",),
    centralized_methods=(),
    # Every client the same size, its task mixture Dir(alpha): the per-task split leaves clients empty at
    # alpha 0.1 with 100 clients on this data.
    common={"eval-samples": 64, "partitioner": "inner-dirichlet"},
    federated={"fraction-train": HETEROGENEITY_CLIENTS_PER_ROUND / 100, "min-available-nodes": 100},
    supernodes=100,
    seeds=(0, 1, 2),
    dataset_seeds={"dolly": (0, 1)},
    variants={
        f"alpha {alpha:g} / {steps} steps": {
            "alpha": alpha, "local-steps": steps,
            "num-server-rounds": HETEROGENEITY_CLIENT_STEPS // (HETEROGENEITY_CLIENTS_PER_ROUND * steps),
        }
        for steps in (20, 100) for alpha in (10.0, 0.5, 0.1)
    },
)

# The paper's federated regime (Table 3): 20 rounds of 10 of 100 clients x 250 local steps, at the
# heterogeneity grid's most skewed split. Each dataset on a base damaged about as much, against its
# dense self, as the paper's LLaMA-7B at 75%: this 135M base no longer models Dolly at 75%.
REGIME = Profile(
    name="regime",
    description="federated: FedPrompt vs MoPs at the paper's scale, 20 rounds x 10 of 100 clients x 250 local steps, "
                "Dirichlet alpha 0.1 (SNI at SparseGPT 75%, Dolly at 50%); hours a cell on a 2-core CPU",
    model="smollm2",
    datasets=("sni", "dolly"),
    compressions=("sparsegpt:0.75",),
    dataset_compressions={"dolly": ("sparsegpt:0.5",)},
    centralized_methods=(),
    common={
        "eval-samples": 0,  # the whole test split: the answer is a paired difference of a few percent
        "partitioner": "inner-dirichlet", "alpha": 0.1,
        "generation-samples": 16,  # 112 answers: ROUGE-L of 28 moves by points between seeds
    },
    federated={
        "num-server-rounds": 20, "local-steps": 250, "fraction-train": 0.1, "min-available-nodes": 100,
        "fraction-evaluate": 1.0,  # every client scores every round on its own held-out data: the same clients each round
        "metrics-every": 5,  # ROUGE-L and exact match at rounds 5, 10, 15, 20
        "round-timeout": 6 * 3600.0,  # a round of 2,500 float32 client steps on 2 cores takes most of an hour
    },
    supernodes=100,
    seeds=(0, 1),
    stage_rounds=5,  # FedPrompt and MoPs of a seed to round 5, then both to 10, ...: the rounds metrics-every scores
)

# Personalized gates (gate-aggregation=local) against one global gate and FedPrompt, at the grid's
# scale, at the most and the least skewed split. Every evaluating client is scored on its own
# held-out data, and in the last round also after adapting a copy (personalize-steps, the same for
# every method), so the adaptation costs no run of its own.
PERSONAL = Profile(
    name="personal",
    description="federated: FedPrompt, MoPs with one global gate, MoPs with a gate per client (gate-aggregation=local), "
                "each evaluating client of the last round scored before and after 20 adaptation steps; Dirichlet alpha 10 and 0.1, "
                "5 rounds x 10 of 100 clients x 20 local steps (SNI at SparseGPT 75%, Dolly at 50%)",
    model="smollm2",
    datasets=("sni", "dolly"),
    compressions=("sparsegpt:0.75",),
    dataset_compressions={"dolly": ("sparsegpt:0.5",)},
    centralized_methods=(),
    common={"eval-samples": 64, "partitioner": "inner-dirichlet"},
    federated={"num-server-rounds": 5, "local-steps": 20, "fraction-train": 0.1, "min-available-nodes": 100,
               "fraction-evaluate": 0.2, "personalize-steps": 20},
    supernodes=100,
    seeds=(0, 1),
    variants={  # FedPrompt has no gate: its cells are the same in both (GATE_ONLY), run once
        f"alpha {alpha:g}" + (" / local gates" if local else ""): {"alpha": alpha, **({"gate-aggregation": "local"} if local else {})}
        for alpha in (10.0, 0.1) for local in (False, True)
    },
)

PROFILES = {p.name: p for p in (QUICK, PAPER, ABLATION, FEDERATED_ABLATION, HETEROGENEITY, REGIME, PERSONAL)}


@dataclass(frozen=True)
class Cell:
    kind: Literal["centralized", "federated"]
    method: str  # prompt | mops | lora | ia3 (centralized); fedprompt | mops (federated)
    settings: dict[str, Any]  # the full flat settings the cell runs with
    study: str = "main"  # "main" (the tables), "inject-layer" (Fig. 2), "prompts-per-expert" (Fig. 3)
    variants: tuple[str, ...] = ("default",)  # the profile's names for the setting changes this cell serves

    @property
    def dataset(self) -> str:
        return self.settings["dataset"]

    @property
    def compression(self) -> str:
        return self.settings["compression"]

    @property
    def id(self) -> str:
        """Readable and unique: the folder a new run of this cell writes (its full settings hashed).

        Finished runs are found by their content (`same_settings`), not by this name.
        """
        digest = hashlib.sha256(json.dumps([self.kind, self.method, result_settings(self.settings)], sort_keys=True).encode()).hexdigest()[:8]
        compression = self.compression.replace(":", "-")
        dataset = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.dataset.strip("/.~"))[-40:]  # a path or hub id names a folder too
        return f"{self.kind[:4]}-{self.method}-{dataset}-{compression}-{digest}"


DEFAULTS = Settings().to_flat()


def result_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that decide a cell's numbers: all but where its metrics are shown (`NOT_RESULTS`), so
    that a grid watched another way, or recorded before tracking existed, is the same grid; a setting
    added later (`ADDED_LATER`) counts only where it differs from what the runs before it had."""
    return {k: v for k, v in recorded(settings).items()
            if k not in NOT_RESULTS and not (k in ADDED_LATER and v == ADDED_LATER[k])}


def same_settings(saved: dict[str, Any], current: dict[str, Any], *, gated: bool = True) -> bool:
    """Whether a finished run ran with these settings: exactly these keys, at these values.

    For an ungated method the gate's settings do not act, so they do not count either.
    """
    saved, current = result_settings(saved), result_settings(current)
    keys = [k for k in current if gated or k not in GATE_ONLY]
    return set(saved) == set(current) and all(saved[k] == current[k] for k in keys)


# Settings that act only on a gated model: a baseline cell keeps their defaults, so that variants
# of the gate share one baseline run instead of recomputing identical ones.
GATE_ONLY = (
    "gating", "gate-hidden", "gate-input-norm", "gate-input", "gate-scale", "gate-floor",
    "gate-lr-scale", "gate-balance", "gate-pretrain-steps", "gate-pretrain-samples", "gate-pretrain-lr",
    "expert-aggregation", "gate-aggregation",
)


def _settings(flat: dict[str, Any], gated: bool) -> dict[str, Any]:
    """Validated and complete: a wrong key or value fails here, before any cell runs."""
    from mops_core.data import PRESETS, run_tasks  # torch and transformers come with it: only when cells are made

    resolved = Settings.from_flat(flat)
    if resolved.data.dataset in PRESETS:  # a preset's tasks are known without reading it: say how many experts
        resolved = resolved.for_tasks(run_tasks(resolved.data))
    settings = resolved.to_flat()
    if not gated:
        settings.update({k: DEFAULTS[k] for k in GATE_ONLY})
    return settings


def cells(profile: Profile, overrides: dict[str, Any] | None = None, *, kinds: tuple[str, ...] = ("centralized", "federated")) -> list[Cell]:
    """Every cell of the profile, in the order they run (tables first, then the sweeps)."""
    overrides = overrides or {}
    result: list[Cell] = []

    def add(kind: str, method: str, flat: dict[str, Any], study: str = "main", variant: str = "default") -> None:
        stage = profile.centralized if kind == "centralized" else profile.federated
        base_method = {"fedprompt": "fedprompt", "mops": "mops"}.get(method, "prompt")
        settings = _settings(
            {"model": profile.model, **profile.common, **stage, **flat, **overrides, "method": base_method}, gated=method == "mops"
        )
        cell = Cell(kind, method, settings, study, (variant,))
        for i, known in enumerate(result):
            if known.id == cell.id:  # the same run serves several variants (e.g. one baseline for all gates)
                if variant not in known.variants:
                    result[i] = replace(known, variants=known.variants + (variant,))
                return
        result.append(cell)

    for dataset in profile.datasets:
        for compression in profile.dataset_compressions.get(dataset, profile.compressions):
            for variant, changes in profile.variants.items():
                for seed in profile.dataset_seeds.get(dataset, profile.seeds):
                    where = {"dataset": dataset, "compression": compression, "seed": seed, **changes}
                    if "centralized" in kinds:
                        for method in profile.centralized_methods:
                            add("centralized", method, where, variant=variant)
                    if "federated" in kinds:
                        for method in profile.federated_methods:
                            add("federated", method, where, variant=variant)
    if "centralized" in kinds and profile.datasets and profile.compressions:
        where = {"dataset": profile.datasets[0], "compression": profile.compressions[0]}
        for layer in profile.inject_layers:
            add("centralized", "mops", {**where, "inject-layer": layer}, "inject-layer")
            if profile.sweep_baseline:
                add("centralized", "prompt", {**where, "inject-layer": layer}, "inject-layer")
        for per_expert in profile.prompts_per_expert:
            add("centralized", "mops", {**where, "prompts-per-expert": per_expert}, "prompts-per-expert")
    return result
