"""The base as runs use it: loaded, then compressed, from a cache after the first time.

Pruning SmolLM2 with SparseGPT takes minutes; every centralized run, the server and each
simulated client would otherwise repeat it. The first to need a compressed base computes it
under a file lock and stores the changed weights (safetensors) with a JSON record of how they
were made (method, ratio, calibration, source fingerprint, result fingerprint, per-matrix
sparsity, wall time). Later runs load that. A cache entry that does not match what is asked,
or whose weights do not reproduce the recorded result, is an error naming the file: it is
never silently used.

`export_base` writes a compressed base as a Hugging Face directory that any node loads with
`model = DIR`: the record inside says it is compressed already, so loading it compresses
nothing again, and its fingerprint is the one the server checks nodes against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .. import atomic
from ..cache import touch
from ..config import CALIBRATION_DATA, ModelConfig, Settings
from ..data import Formatter, load_records, sample_and_split
from ..loading import base_fingerprint, cache_root, code_identity, load_base, quiet_progress
from ..parsing import SettingsError
from .int8 import quantize_int8
from .layerwise import MatrixStats, block_linears, prune_model

log = logging.getLogger(__name__)
META_FILE = "compression.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "mops-fl-compressed-base"
EXPORT_FILE = "mops_compression.json"  # in an exported base's directory: how it was made
_CODE = ("mops_core.compression",)  # the pruners; the calibration text enters by its token ids


class CompressionCacheError(RuntimeError):
    """A cached compressed base is corrupt or was made for something else."""


@dataclass
class CompressionReport:
    compression: str
    seconds: float
    from_cache: bool
    backend: str = ""
    stats: list[MatrixStats] = dataclasses.field(default_factory=list)

    @property
    def sparsity(self) -> float:
        numel = sum(s.numel for s in self.stats)
        return sum(s.zeros for s in self.stats) / numel if numel else 0.0

    def per_layer(self) -> dict[int, float]:
        layers: dict[int, list[MatrixStats]] = {}
        for s in self.stats:
            layers.setdefault(s.layer, []).append(s)
        return {i: sum(s.zeros for s in ss) / sum(s.numel for s in ss) for i, ss in sorted(layers.items())}


def calibration_ids(settings: Settings, tokenizer: PreTrainedTokenizerBase, sink_token_id: int) -> torch.Tensor:
    """(n, length) token ids: training instructions, shuffled (seeded), packed, each sequence after the sink."""
    cfg = settings.compression
    train, _ = sample_and_split(load_records(settings.data), settings.data)
    random.Random(settings.data.data_seed).shuffle(train)
    formatter = Formatter(tokenizer, settings.data.max_length, ())  # questions only: task ids do not matter here
    body = cfg.calibration_length - 1
    stream: list[int] = []
    for record in train:
        stream += formatter.question_ids(record.instruction, record.context)
        if len(stream) >= cfg.calibration_samples * body:
            break
    count = min(cfg.calibration_samples, len(stream) // body)
    if count < cfg.calibration_samples:
        log.warning("only %d calibration sequences of %d tokens in the training instructions", count, cfg.calibration_length)
    if count == 0:
        raise ValueError("the training instructions are too short for one calibration sequence")
    rows = [[sink_token_id] + stream[i * body : (i + 1) * body] for i in range(count)]
    return torch.tensor(rows, dtype=torch.long)


def cache_dir(settings: Settings, source_fingerprint: str, calibration: torch.Tensor | None) -> tuple[Path, dict]:
    ids = None if calibration is None else hashlib.sha256(calibration.cpu().numpy().tobytes()).hexdigest()[:24]
    determining = {
        "source": source_fingerprint,
        "compression": dataclasses.asdict(settings.compression),
        "calibration_data": {k: getattr(settings.data, k) for k in CALIBRATION_DATA},
        "calibration_ids": ids,  # what the pruner sees, exactly, whatever code read and tokenised it
        "code": code_identity(*_CODE),
    }
    key = hashlib.sha256(json.dumps(determining, sort_keys=True).encode()).hexdigest()[:24]
    method = settings.compression.compression.replace(":", "-")
    return cache_root(settings.model) / "compressed" / f"{method}-{key}", determining


def _save(model: PreTrainedModel, path: Path, meta: dict) -> None:
    tensors = {
        f"model.layers.{i}.{name}": linear.weight.detach().cpu().contiguous()
        for i, layer in enumerate(model.model.layers)
        for name, linear in block_linears(layer).items()
    }
    with atomic.directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        atomic.write_json(tmp / META_FILE, meta)


def _load(model: PreTrainedModel, path: Path, determining: dict) -> dict:
    fix = f"; delete {path} to compress again"
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompressionCacheError(f"{path / META_FILE} is corrupt ({exc}){fix}") from None
    if meta.get("format") != FORMAT or meta.get("determining") != determining:
        raise CompressionCacheError(f"{path / META_FILE} records another compression or base than the one asked for{fix}")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CompressionCacheError(f"{path / WEIGHTS_FILE} is corrupt ({exc}){fix}") from None
    expected = {
        f"model.layers.{i}.{name}": linear
        for i, layer in enumerate(model.model.layers)
        for name, linear in block_linears(layer).items()
    }
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].weight.shape for k in expected):
        raise CompressionCacheError(f"{path / WEIGHTS_FILE} does not hold this model's linear layers{fix}")
    with torch.no_grad():
        for name, linear in expected.items():
            linear.weight.copy_(tensors[name].to(linear.weight.device, linear.weight.dtype))
    if base_fingerprint(model) != meta.get("result_fingerprint"):
        raise CompressionCacheError(f"{path / WEIGHTS_FILE} does not reproduce the compressed base it recorded{fix}")
    return meta


def compress_base(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings, *, progress: bool = True
) -> CompressionReport | None:
    """Compress `model` in place as the settings say (None for 'none')."""
    cfg = settings.compression
    spec = cfg.spec
    if spec.method == "none":
        return None
    started = time.perf_counter()
    if spec.method == "int8":  # quick and deterministic: no cache needed
        backend = quantize_int8(model)
        return CompressionReport(cfg.compression, time.perf_counter() - started, False, backend)
    sink = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    calibration = calibration_ids(settings, tokenizer, sink) if spec.calibrated else None
    path, determining = cache_dir(settings, base_fingerprint(model), calibration)
    with atomic.file_lock(path.with_name(path.name + ".lock")):
        if (path / META_FILE).exists():
            meta = _load(model, path, determining)
            touch(path)
            stats = [MatrixStats(**s) for s in meta["stats"]]
            return CompressionReport(cfg.compression, meta["seconds"], True, "cache", stats)
        stats = prune_model(
            model, calibration, spec, blocksize=cfg.sparsegpt_blocksize, damp=cfg.sparsegpt_damp,
            dtype=getattr(torch, cfg.prune_dtype), progress=progress,
        )
        seconds = time.perf_counter() - started
        meta = {
            "format": FORMAT,
            "determining": determining,
            "method": spec.method,
            "pattern": dataclasses.asdict(spec.pattern),
            "calibration_sequences": 0 if calibration is None else int(calibration.shape[0]),
            "result_fingerprint": base_fingerprint(model),
            "seconds": seconds,
            "stats": [dataclasses.asdict(s) for s in stats],
        }
        _save(model, path, meta)
    log.info("compressed the base (%s) in %.0f s; cached at %s", cfg.compression, seconds, path)
    return CompressionReport(cfg.compression, seconds, False, spec.method, stats)


def exported_compression(cfg: ModelConfig) -> dict | None:
    """The record of an exported compressed base (None for any other model)."""
    path = Path(cfg.model).expanduser() / EXPORT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompressionCacheError(f"{path} is corrupt ({exc}); export the base again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "fingerprint" not in record:
        raise CompressionCacheError(f"{path} is not a mops-fl export record; export the base again")
    return record


def check_exportable(settings: Settings) -> None:
    """Refuse, before any work, a compression whose base cannot be exported."""
    if settings.compression.spec.method == "int8":
        raise SettingsError(
            "--export: int8 needs no export (each node quantises the same base in seconds, to the same fingerprint), "
            "and its quantised modules cannot be saved as a Hugging Face model"
        )


def export_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: Settings, target: Path) -> str:
    """Write the compressed base where nodes load it from (`model = target`); returns its fingerprint."""
    check_exportable(settings)
    fingerprint = base_fingerprint(model)
    with atomic.directory(target) as tmp, quiet_progress():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic.write_json(tmp / EXPORT_FILE, {
            "format": FORMAT, "compression": settings.compression.compression, "source_model": settings.model.model,
            "dtype": str(model.dtype).removeprefix("torch."), "fingerprint": fingerprint,
        })
    return fingerprint


def prepare_base(settings: Settings, *, progress: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base every run uses: loaded, then compressed (from the cache when possible).

    An exported base is compressed already: it is used as it is, whatever `compression` says."""
    model, tokenizer = load_base(settings.model)
    exported = exported_compression(settings.model)
    if exported is None:
        compress_base(model, tokenizer, settings, progress=progress)
    elif base_fingerprint(model) != exported["fingerprint"]:
        raise CompressionCacheError(
            f"{settings.model.model} does not reproduce the fingerprint its {EXPORT_FILE} records; export the base again"
        )
    elif exported["compression"] != settings.compression.compression:
        log.warning("%s is a base exported after %s compression; it is used as it is (compression %s is not applied again)",
                    settings.model.model, exported["compression"], settings.compression.compression)
    return model, tokenizer
