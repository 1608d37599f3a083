"""One settings dataclass per concern, validated on construction.

The same names work in `pyproject.toml` (`[tool.flwr.app.config]`, kebab-case), on the
command line (`--kebab-case`) and in a checkpoint's JSON. `Settings.from_flat` routes a flat
mapping to the concern that owns each key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from .parsing import build, check_unique_fields, field, setting_error, split_by_owner, to_flat_dict

EMBEDDED_MODEL = "smollm2"

# The demo's deliberate changes to the defaults. pyproject.toml's [tool.flwr.app.config], what
# `flwr run .` and `make demo` run with, is every default with these on top (tests hold it to that).
DEMO = {
    "eval-samples": 96,  # a round's evaluation on 96 test samples takes seconds; 0 (all 502) takes minutes
    "fraction-evaluate": 0.05,  # 5 of 100 clients score each round on their own data: the spread, at half the cost
}

# Settings a resumed federated run may change; any other difference means another experiment.
RESUMABLE = frozenset({
    "num-server-rounds", "resume", "round-timeout", "round-deadline", "min-replies", "eval-samples", "eval-batch-size",
    "min-available-nodes", "out-dir", "fraction-evaluate", "personalize-steps", "metrics-every", "generation-samples", "max-new-tokens", "tracking", "tracking-dir",
    "reply-cache-dir",
})


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The frozen base: which model, in which dtype, on which device, cached where."""

    model: str = field(
        EMBEDDED_MODEL,
        "base LLaMA-family model: 'smollm2' (the embedded GGUF), a local HF directory, or a hub id",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        "auto",
        "dtype of the frozen base ('auto' = bfloat16 where the hardware has bfloat16 units: a GPU of compute "
        "capability 8.0 or later, a CPU with AVX-512 bf16 or AMX; else float32); trainable parameters are always float32",
    )
    device: Literal["auto", "cpu", "cuda"] = field("auto", "where the model runs ('auto' = CUDA when present)")
    compile: bool = field(
        True,
        "run the decoder layers and the loss through torch.compile: faster steps after a compile paid once per process "
        "(seconds to a minute, less with inductor's disk cache warm); eager, with the reason logged, where it "
        "cannot run (no C++ compiler on CPU)",
    )
    model_cache_dir: str = field("", "the machine's cache of bases (dequantised, compressed), start states and activations ('' = $MOPS_CACHE_DIR, else ~/.cache/mops-fl); `mops cache` lists and prunes it")

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise setting_error("model", "must name a model")


@dataclasses.dataclass(frozen=True)
class MoPsConfig:
    """The mixture: experts and their prompts, where they enter, and the gate that weighs them."""

    method: Literal["mops", "prompt", "fedprompt"] = field(
        "mops", "'mops' (gated experts) or the no-gating baseline: 'prompt' (centralized) / 'fedprompt'"
    )
    gating: Literal["attention", "hidden", "none"] = field(
        "attention",
        "how expert scores act: log-g on attention to the prompts ('attention'), the paper's literal "
        "product on the prompts' hidden states ('hidden'), or not at all ('none')",
    )
    experts: int = field(0, "number of prompt experts E (0 = one per task of the run; expert i is pretrained on task i)")
    prompts_per_expert: int = field(10, "prompts per expert; K = experts x prompts-per-expert")
    inject_layer: int = field(
        -1, "0-based index of the first decoder layer that sees the trainable prompts (-1 = floor(0.31 L))"
    )
    gate_hidden: int = field(128, "width d_g of the gating MLP")
    gate_input_norm: Literal["rms", "none", "standardise"] = field(
        "rms",
        "what the gate does to its input first: scale it to unit RMS, feed it raw, or standardise every "
        "dimension by its mean and spread over the gate-pretraining instructions",
    )
    gate_input: Literal["prompts+question", "question", "last"] = field(
        "question",
        "what the gate reads entering inject-layer: the mean over prompts and question (the paper's "
        "average), the mean over the question alone, or the question's last token",
    )
    gate_scale: Literal["one", "experts"] = field(
        "experts",
        "what weighs expert e's prompts: g_e (the paper; a uniform gate turns every prompt down to 1/E) "
        "or E g_e (a uniform gate leaves the prompts as the ungated baseline has them)",
    )
    gate_floor: float = field(
        0.0,
        "least score of every expert: g = floor + (1 - E floor) softmax (below 1/E); 0.1 keeps every prompt in "
        "every input, for tasks that share one format",
    )

    def __post_init__(self) -> None:
        if self.experts < 0:
            raise setting_error("experts", f"must be 0 (one per task) or more, got {self.experts}")
        if self.prompts_per_expert < 0:
            raise setting_error("prompts_per_expert", f"must be 0 or more, got {self.prompts_per_expert}")
        if self.inject_layer < -1:
            raise setting_error("inject_layer", f"must be -1 (auto) or a layer index, got {self.inject_layer}")
        if self.gate_hidden < 1:
            raise setting_error("gate_hidden", f"must be at least 1, got {self.gate_hidden}")
        limit = 1.0 / self.experts if self.experts else 1.0  # 0 experts: checked again once the tasks are known
        if not 0.0 <= self.gate_floor < limit:
            raise setting_error("gate_floor", f"must be in [0, 1/experts) = [0, {limit:.4g}), got {self.gate_floor}")

    @property
    def num_prompts(self) -> int:
        return self.experts * self.prompts_per_expert

    @property
    def effective_gating(self) -> str:
        """The baselines ('prompt', 'fedprompt') never gate, whatever `gating` says."""
        return self.gating if self.method == "mops" else "none"

    def resolve_inject_layer(self, num_layers: int) -> int:
        """`inject_layer`, with the paper's ratio (10 of 32, 1-based) applied when it is -1."""
        layer = math.floor(0.31 * num_layers) if self.inject_layer == -1 else self.inject_layer
        if not 1 <= layer < num_layers:
            raise setting_error(
                "inject_layer", f"must be between 1 and {num_layers - 1} for a {num_layers}-layer model, got {layer}"
            )
        return layer


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The multi-task instruction data and its train/test split."""

    dataset: str = field(
        "dolly",
        "the data: 'dolly' or 'sni' (the paper's; a local copy first, then the hub), a .jsonl/.json/.parquet file "
        "or a folder of them, a saved `datasets` folder, or a hub dataset id",
    )
    data_dir: str = field(
        "", "folder holding the presets' dolly/ and sni/ files ('' = $MOPS_DATA_DIR, ../shared/data, then the hub)"
    )
    tasks: str = field(
        "",
        "comma-separated tasks the run trains, in expert order ('' = the preset's seven, or every task of the data "
        "sorted by name); records of other tasks are left out",
    )
    instruction_column: str = field(
        "instruction", "field of your data (and of node-local files) holding the instruction; the presets know their own"
    )
    context_column: str = field("context", "field holding the context the instruction refers to ('' = the data has none)")
    response_column: str = field("response", "field holding the reference response, the only tokens trained on")
    task_column: str = field("task", "field holding each record's task label: the gate's routing target")
    samples: int = field(5000, "samples drawn evenly over the dataset's tasks before the split")
    test_fraction: float = field(0.1, "share of each task held out for testing")
    max_length: int = field(256, "maximum tokens of question + response (the sink and prompts come on top)")
    data_seed: int = field(0, "seed of sampling and the train/test split")

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise setting_error("samples", f"must be at least 2, got {self.samples}")
        if not 0.0 < self.test_fraction < 1.0:
            raise setting_error("test_fraction", f"must be between 0 and 1, got {self.test_fraction}")
        if self.max_length < 32:
            raise setting_error("max_length", f"must be at least 32 tokens, got {self.max_length}")
        if not self.dataset.strip():
            raise setting_error("dataset", "must name a preset, a file or folder, or a hub dataset")
        for name in ("instruction_column", "response_column", "task_column"):
            if not getattr(self, name).strip():
                raise setting_error(name, "must name a field of the data")
        if self.tasks.strip() and not self.task_list:
            raise setting_error("tasks", f"names no task in {self.tasks!r}; leave it empty for every task of the data")
        repeated = sorted({t for t in self.task_list if self.task_list.count(t) > 1})
        if repeated:
            raise setting_error("tasks", f"names {', '.join(repeated)} more than once")

    @property
    def task_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training: the two pretraining stages, the step loop, evaluation and the activation cache."""

    steps: int = field(300, "optimizer steps of MoPs (or baseline) training")
    lr: float = field(1e-3, "learning rate of the gate (AdamW), and of the injected prompts unless prompt-lr says otherwise")
    prompt_lr: float = field(
        0.0,
        "learning rate of the injected prompts; 0 = lr x the RMS of their starting hidden states, so that they "
        "move at the pace of their scale (set it to lr for the paper's single rate)",
    )
    gate_lr_scale: float = field(
        1.0, "the gate's learning rate during tuning, as a multiple of lr; 0 keeps the pretrained gate fixed"
    )
    gate_balance: float = field(
        0.0, "weight of KL(running mean gate || uniform) in the loss: keeps every expert in use (0.5 where tasks differ in kind)"
    )
    batch_size: int = field(1, "samples per optimizer step")
    input_prompt_init: Literal["vocab", "text"] = field(
        "text",
        "how the input prompts P1 start: embeddings of input-prompt-text's tokens repeated to fill them, or of "
        "random vocabulary tokens (PEFT's TEXT and SAMPLE_VOCAB inits)",
    )
    input_prompt_text: str = field(
        "You are a helpful assistant. Read the instruction and any context, then answer it well.",
        "the text whose token embeddings start P1 when input-prompt-init is 'text'",
    )
    input_prompt_steps: int = field(20, "steps of plain prompt tuning of the frozen input prompts P1 (paper: 20)")
    input_prompt_lr: float = field(1e-3, "learning rate of input-prompt pretraining")
    gate_pretrain_steps: int = field(200, "steps of gate pretraining on instructions with task labels (0 = skip)")
    gate_pretrain_samples: int = field(512, "training instructions used for gate pretraining")
    gate_pretrain_lr: float = field(1e-3, "learning rate of gate pretraining")
    eval_batch_size: int = field(8, "samples per evaluation forward pass")
    activation_cache: bool = field(True, "reuse each sample's hidden states below inject-layer (exact: that part is frozen)")
    activation_cache_mb: float = field(2048.0, "memory the activation cache may use per process (on the base's device; the simulation launcher counts it in each actor's share of memory)")
    activation_cache_disk_mb: float = field(8192.0, "disk the activation cache may use (under the model cache)")
    eval_samples: int = field(0, "test samples to evaluate (0 = the whole test split)")
    generation_samples: int = field(
        4, "test samples per task answered by greedy decoding and scored by ROUGE-L and exact match (0 = none)"
    )
    max_new_tokens: int = field(64, "most tokens generated per answer: by mops generate, and when scoring ROUGE-L and exact match")
    seed: int = field(0, "seed of initialisation and sample order")

    def __post_init__(self) -> None:
        for name in ("steps", "input_prompt_steps", "gate_pretrain_steps", "eval_samples", "generation_samples"):
            if getattr(self, name) < 0:
                raise setting_error(name, f"must be 0 or more, got {getattr(self, name)}")
        for name in ("batch_size", "eval_batch_size", "gate_pretrain_samples", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise setting_error(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("lr", "input_prompt_lr", "gate_pretrain_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise setting_error(name, f"must be a positive number, got {value}")
        if self.input_prompt_init == "text" and not self.input_prompt_text.strip():
            raise setting_error("input_prompt_text", "must hold some text when input-prompt-init is 'text'")
        for name in ("activation_cache_mb", "activation_cache_disk_mb", "prompt_lr", "gate_lr_scale", "gate_balance"):
            if not getattr(self, name) >= 0:
                raise setting_error(name, f"must be 0 or more, got {getattr(self, name)}")


def number_or_multiple(text: str) -> tuple[float, bool] | None:
    """'0.5' -> (0.5, False); '3x' -> (3.0, True): N times a round's median; '' -> None."""
    text = text.strip()
    if not text:
        return None
    return float(text.removesuffix("x")), text.endswith("x")


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
    """The federated run: rounds, sampled clients, the non-i.i.d. split, aggregation, resume."""

    num_server_rounds: int = field(3, "federated rounds (paper: 20)")
    fraction_train: float = field(0.1, "share of the connected nodes sampled each round (paper: 10 of 100)")
    fraction_evaluate: float = field(
        0.1, "share of the connected nodes that score each round's global adapter on their own held-out data (0 = none)"
    )
    client_test_fraction: float = field(
        0.1, "share of each client's data held out, never trained on, for federated evaluation (0 = none: train on all)"
    )
    metrics_every: int = field(
        0, "rounds between the costly scores: ROUGE-L / exact match of the global adapter on the server, and the "
        "evaluating clients' adaptation (personalize-steps) (0 = the last round only)"
    )
    min_available_nodes: int = field(100, "round 1 waits until this many nodes are connected")
    local_steps: int = field(10, "optimizer steps each sampled client runs per round (paper: 250)")
    expert_aggregation: Literal["examples", "gate"] = field(
        "gate",
        "how the server averages each expert's prompts: by examples x the client's mean gate score on that "
        "expert, so an expert learns from the clients that used it, or by examples alone (FedAvg, the paper)",
    )
    gate_aggregation: Literal["global", "local"] = field(
        "global",
        "'global': the server averages the clients' gates into one, as the experts (the paper); 'local': each node "
        "keeps its own gate across rounds (in its Flower node state), trains it with the experts and sends only the "
        "experts, so every client routes its own mix; the server's gate stays the pretrained one (gated methods only)",
    )
    personalize_steps: int = field(
        0,
        "steps an evaluating client first trains a copy of what personalizes the model (the gate; an ungated model's "
        "prompts) on its own training share, scoring its held-out share before and after, in the rounds that "
        "metrics-every names and the last (0 = no adaptation)",
    )
    alpha: float = field(0.5, "Dirichlet concentration of the non-i.i.d. task split over clients (lower = more skewed)")
    partitioner: Literal["dirichlet", "inner-dirichlet"] = field(
        "dirichlet",
        "how alpha splits the tasks (flwr-datasets): 'dirichlet' spreads each task's samples over the clients by "
        "Dir(alpha), so clients differ in size and low alpha leaves some nearly empty; 'inner-dirichlet' gives every "
        "client the same number of samples and draws its task mixture from Dir(alpha), which stays feasible at "
        "alpha 0.1 with 100 clients on small data",
    )
    min_partition_size: int = field(5, "smallest client training set the 'dirichlet' split may produce")
    out_dir: str = field("runs/federated", "where checkpoints, results.json and figures go")
    resume: bool = field(False, "continue from the checkpoint in out-dir, at the round after it")
    reply_cache_dir: str = field(
        "",
        "where each node keeps its last finished training reply (on its own disk), so that a round run again after "
        "the server stopped mid-round (a crash, a session's end) takes the replies already computed instead of "
        "training again; a reply is reused only for the same round, data partition, settings and global state. "
        "'' = none kept",
    )
    round_timeout: float = field(3600.0, "seconds the server waits for a round's replies, and for min-available-nodes to connect")
    round_deadline: str = field(
        "",
        "once min-replies replies are in, stop waiting for a round's stragglers at this point: seconds after the "
        "messages went out, or Nx (N times the median time of the round's replies so far, e.g. 3x); their replies are "
        "dropped and logged. '' = wait for every reply that can still come (a node gone is never waited for)",
    )
    min_replies: int = field(1, "replies a round needs before round-deadline may end it")
    update_norm_bound: str = field(
        "",
        "drop a client's update whose L2 distance from the round's global experts and gate exceeds this: a number "
        "(absolute), or Nx (N times the round's median client update, e.g. 3x); '' = no bound",
    )
    dp_clip: float = field(
        0.0, "differential privacy (Flower's fixed-clipping wrapper): clip every client update to this L2 norm (0 = no DP)"
    )
    dp_noise: float = field(
        0.0, "differential privacy: Gaussian noise multiplier z; the average gets noise of std z x dp-clip / sampled clients"
    )
    dp_clipping: Literal["server", "client"] = field(
        "server", "where updates are clipped under DP: by the server on receipt, or by each client before it replies"
    )

    @property
    def norm_bound(self) -> tuple[float, bool] | None:
        """(bound, relative to the round's median), or None when updates are not bounded."""
        return number_or_multiple(self.update_norm_bound)

    @property
    def deadline(self) -> tuple[float, bool] | None:
        """(seconds, or a multiple of the round's median reply time), or None: no deadline."""
        return number_or_multiple(self.round_deadline)

    def costly_scores_due(self, number: int) -> bool:
        """Whether round `number` takes the costly scores, the server's greedy answers (ROUGE-L / exact match)
        and the evaluating clients' adaptation (personalize-steps): every `metrics-every` rounds (from the
        start), and the last."""
        return number == self.num_server_rounds or (self.metrics_every > 0 and number % self.metrics_every == 0)

    def __post_init__(self) -> None:
        for key in ("update_norm_bound", "round_deadline"):
            try:
                amount = number_or_multiple(getattr(self, key))
            except ValueError:
                raise setting_error(key, f"must be a number or Nx (e.g. 3x), got {getattr(self, key)!r}") from None
            if amount is not None and not (math.isfinite(amount[0]) and amount[0] > 0 and (amount[0] >= 1 or not amount[1])):
                raise setting_error(key, f"must be positive (a multiple of the median at least 1x), got {getattr(self, key)!r}")
        if self.min_replies < 1:
            raise setting_error("min_replies", f"must be at least 1, got {self.min_replies}")
        if not (math.isfinite(self.dp_clip) and self.dp_clip >= 0):
            raise setting_error("dp_clip", f"must be 0 (no DP) or a positive norm, got {self.dp_clip}")
        if not (math.isfinite(self.dp_noise) and self.dp_noise >= 0):
            raise setting_error("dp_noise", f"must be 0 or more, got {self.dp_noise}")
        if self.dp_noise > 0 and self.dp_clip == 0:
            raise setting_error("dp_noise", "needs dp-clip: the noise is scaled to the clipping norm")
        if self.gate_aggregation == "local" and self.dp_clip > 0:
            raise setting_error("gate_aggregation", "'local' with dp-clip: Flower's DP wrappers clip the whole global state, "
                                "of which local gates send only a part; use gate-aggregation='global' under DP")
        if self.personalize_steps < 0:
            raise setting_error("personalize_steps", f"must be 0 or more, got {self.personalize_steps}")
        if self.num_server_rounds < 1:
            raise setting_error("num_server_rounds", f"must be at least 1, got {self.num_server_rounds}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise setting_error("fraction_train", f"must be in (0, 1], got {self.fraction_train}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:
            raise setting_error("fraction_evaluate", f"must be in [0, 1], got {self.fraction_evaluate}")
        if not 0.0 <= self.client_test_fraction < 1.0:
            raise setting_error("client_test_fraction", f"must be in [0, 1), got {self.client_test_fraction}")
        if self.fraction_evaluate > 0 and self.client_test_fraction == 0:
            raise setting_error("fraction_evaluate", "needs client-test-fraction above 0: the clients hold no data to evaluate on")
        if self.metrics_every < 0:
            raise setting_error("metrics_every", f"must be 0 or more, got {self.metrics_every}")
        if self.min_available_nodes < 1:
            raise setting_error("min_available_nodes", f"must be at least 1, got {self.min_available_nodes}")
        if self.local_steps < 1:
            raise setting_error("local_steps", f"must be at least 1, got {self.local_steps}")
        if not self.alpha > 0:
            raise setting_error("alpha", f"must be positive, got {self.alpha}")
        if self.min_partition_size < 1:
            raise setting_error("min_partition_size", f"must be at least 1, got {self.min_partition_size}")
        if self.round_timeout <= 0:
            raise setting_error("round_timeout", f"must be positive, got {self.round_timeout}")


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """How the base is compressed before tuning (computed once, then cached)."""

    compression: str = field(
        "none", "base compression: none, int8, or sparsegpt|wanda|magnitude:RATIO, RATIO a sparsity (0.75) or N:M (2:4)"
    )
    calibration_samples: int = field(128, "calibration sequences for SparseGPT and Wanda, from the training instructions")
    calibration_length: int = field(256, "tokens per calibration sequence")
    sparsegpt_blocksize: int = field(128, "columns SparseGPT prunes together (a multiple of M for N:M)")
    sparsegpt_damp: float = field(0.01, "SparseGPT's Hessian dampening, as a share of its mean diagonal")
    prune_dtype: Literal["float64", "float32"] = field(
        "float64",
        "arithmetic of calibrated pruning (the block's calibration forward, X X^T, SparseGPT's solve): SparseGPT "
        "amplifies rounding, so in float32 the pruned base depends on the thread count and the hardware; float64 "
        "brings bases made on different machines closer, not equal (an adapter tuned on one can score far worse on "
        "another), at several times the cost (float32 for GPUs with slow float64)",
    )

    def __post_init__(self) -> None:
        from .compression.spec import parse

        try:
            spec = parse(self.compression)
        except ValueError as exc:
            raise setting_error("compression", str(exc)) from None
        if self.calibration_samples < 1:
            raise setting_error("calibration_samples", f"must be at least 1, got {self.calibration_samples}")
        if self.calibration_length < 8:
            raise setting_error("calibration_length", f"must be at least 8, got {self.calibration_length}")
        if self.sparsegpt_blocksize < 1 or (spec.pattern and spec.pattern.structured and self.sparsegpt_blocksize % spec.pattern.m):
            raise setting_error("sparsegpt_blocksize", f"must be a positive multiple of M, got {self.sparsegpt_blocksize}")
        if not self.sparsegpt_damp > 0:
            raise setting_error("sparsegpt_damp", f"must be positive, got {self.sparsegpt_damp}")

    @property
    def spec(self):
        from .compression.spec import parse

        return parse(self.compression)


@dataclasses.dataclass(frozen=True)
class TrackingConfig:
    """Where a run's metrics go while it runs, to watch it and compare it with others (no number changes)."""

    tracking: Literal["tensorboard", "wandb", "none"] = field(
        "tensorboard",
        "where the run's metrics go as it runs: TensorBoard event files (`tensorboard --logdir runs`), Weights & Biases "
        "(offline unless WANDB_MODE says otherwise; `pip install wandb`), or nowhere",
    )
    tracking_dir: str = field("", "where the tracker writes ('' = the run's output folder: <out>/tensorboard, or <out>/wandb)")


CONCERNS: dict[str, type] = {
    "model": ModelConfig,
    "compression": CompressionConfig,
    "mops": MoPsConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "federated": FederatedConfig,
    "tracker": TrackingConfig,
}
# Settings that change where a run's metrics are shown, never the run's numbers.
NOT_RESULTS = frozenset({"tracking", "tracking-dir", "reply-cache-dir"})  # and where nodes keep replies
# Settings added after runs were recorded, with the value every run before them had in effect: a
# record that lacks one ran at this value, so it still matches as the same experiment (a run under
# way resumes with them because they are RESUMABLE too).
ADDED_LATER = {"round-deadline": "", "min-replies": 1, "gate-aggregation": "global", "personalize-steps": 0,
               "reply-cache-dir": ""}


def recorded(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Settings as a record states them: `ADDED_LATER` keys filled in where the record predates them."""
    return {**ADDED_LATER, **settings}
check_unique_fields(CONCERNS)

# The data settings that choose a compressed base's calibration text (with every compression setting
# and the model, they decide the base a run tunes).
CALIBRATION_DATA = ("dataset", "tasks", "instruction_column", "context_column", "response_column", "task_column",
                    "samples", "test_fraction", "max_length", "data_seed")
BASE_SETTINGS = ("model", *(f.name.replace("_", "-") for f in dataclasses.fields(CompressionConfig)),
                 *(name.replace("_", "-") for name in CALIBRATION_DATA))


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs, one validated dataclass per concern."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    compression: CompressionConfig = dataclasses.field(default_factory=CompressionConfig)
    mops: MoPsConfig = dataclasses.field(default_factory=MoPsConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    federated: FederatedConfig = dataclasses.field(default_factory=FederatedConfig)
    tracker: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, context: str = "") -> Settings:
        routed = split_by_owner(values, CONCERNS, context=context)
        return cls(**{name: build(CONCERNS[name], routed[name], context=context) for name in CONCERNS})

    def to_flat(self) -> dict[str, Any]:
        return to_flat_dict(*(getattr(self, name) for name in CONCERNS))

    def replace(self, **flat: Any) -> Settings:
        merged = self.to_flat()
        merged.update({k.replace("_", "-"): v for k, v in flat.items()})
        return Settings.from_flat(merged)

    def for_tasks(self, tasks: tuple[str, ...]) -> Settings:
        """These settings for a run on `tasks`: `experts` 0 becomes one expert per task."""
        if not tasks:
            raise setting_error("tasks", "the run has no task to train")
        return self if self.mops.experts else self.replace(experts=len(tasks))


SETTINGS_DOC_HEADER = """# Settings

Every setting, its default, the demo's value where the demo changes it, and what it does.
Each is a `--kebab-case` flag of `mops`, a key of a `--config` TOML file, and a key of
`[tool.flwr.app.config]` in `pyproject.toml` (`flwr run --run-config "key=value"`). A wrong key
or value fails before anything loads, naming the key.

Generated from `mops_core/config.py` by `mops settings --markdown > docs/settings.md`; a test
fails when this file is stale."""


def settings_markdown() -> str:
    from .parsing import markdown

    return markdown(CONCERNS, DEMO, header=SETTINGS_DOC_HEADER)
