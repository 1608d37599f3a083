"""How many ClientApp actors a simulation runs, with what each: this machine's cores, memory and GPUs
against what each process of the run holds. Reading the machine (`local_cores`, `available_memory`,
`visible_gpus`) is kept apart from deciding (`plan_actors`), which takes what was read and touches
nothing, so that every layout can be tested on any machine.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mops_core.config import Settings


# What a process of the run holds beside its base and its activation cache. In host memory: Python with torch,
# transformers and Flower, the data, compiled code, a step's activations and the buffers the allocator keeps
# for the next step (`benchmarks/process_memory.py` compares the processes' peaks with this estimate). On a GPU:
# the CUDA context and a step's activations, the libraries being in host memory.
PROCESS_BYTES = 2 * 2**30
GPU_PROCESS_BYTES = 2**30


def base_parameters(model: str) -> int | None:
    """The base's parameters, from its config.json (a local checkpoint or one in the Hugging Face cache)
    without loading it. None when there is no config to read (the embedded model, a hub id not downloaded yet)."""
    path = Path(model).expanduser()
    try:
        config: Path | None = path / "config.json" if path.is_dir() else None
        if config is None and model.count("/") == 1:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(model, "config.json")  # a ValueError for what cannot be a hub id
            config = Path(found) if isinstance(found, str) else None
        return config_parameters(json.loads(config.read_text())) if config else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def config_parameters(c: Mapping[str, Any]) -> int:
    """The parameters of a LLaMA-family model of config `c` (config.json's keys); KeyError or TypeError where it lacks one."""
    d, heads = c["hidden_size"], c["num_attention_heads"]
    head_dim, kv = c.get("head_dim") or d // heads, c.get("num_key_value_heads") or heads
    layer = 2 * d * heads * head_dim + 2 * d * kv * head_dim + 3 * d * c["intermediate_size"]
    embeddings = c["vocab_size"] * d * (1 if c.get("tie_word_embeddings") else 2)
    return embeddings + c["num_hidden_layers"] * (layer + 2 * d) + d  # the norms' weights too


def base_bytes(parameters: int, dtype: str) -> int:
    """An upper estimate of one actor's base in memory: its parameters in `dtype` (float32 for anything
    but the two 16-bit types: int8 bases are quantised from a full-precision load)."""
    return parameters * (2 if dtype in ("bfloat16", "float16") else 4)


def footprint(base: int, settings: Settings, *, on_gpu: bool) -> int:
    """An upper estimate of what one process of the run (the ServerApp, each ClientApp actor) holds in the
    memory its `base` bytes are in: the base, the activation cache filled to its bound (`activation-cache-mb`,
    kept on the base's device), and the rest."""
    train = settings.train
    cache = int(train.activation_cache_mb * 2**20) if train.activation_cache else 0
    return base + cache + (GPU_PROCESS_BYTES if on_gpu else PROCESS_BYTES)


def available_memory() -> int | None:
    """Bytes the kernel says new processes can use (/proc/meminfo's MemAvailable); None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def local_cores() -> int:
    """The cores this process may run on, as Ray counts them for a Ray of its own."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def actor_cpus(clients_per_round: int, ray_address: str | None = None, *, each: int | None = None,
               memory: int | None = None, cores: int | None = None) -> int:
    """CPUs per ClientApp actor when none are asked: this machine's cores shared among the clients
    of one round, at least one each, so that they train side by side rather than in turn. Ray gives
    an actor as many threads as CPUs (OMP_NUM_THREADS). A client's batch-1 step is small GEMMs and
    single-threaded work (Python, dynamo, autograd), so two clients on one thread each finish
    sooner than the same two one after the other on two threads. Every actor holds a base of its
    own, and so does the ServerApp: with each such process holding an estimated `each` bytes
    (`footprint`) and `memory` free, no more actors than fit in four fifths of it beside the
    ServerApp. On a Ray cluster this machine's cores and memory say nothing of the cluster's:
    Flower's default, 2."""
    if ray_address:
        return 2
    cores = cores or local_cores()
    cpus = max(1, cores // max(clients_per_round, 1))
    if each and memory:
        fit = max(1, int(0.8 * memory) // each - 1)  # the ServerApp's process is one of them
        cpus = max(cpus, cores // (fit + 1) + 1)  # the fewest CPUs each for which Ray starts (cores // cpus) <= fit actors
    return cpus


class Gpu(NamedTuple):
    memory: int  # bytes
    fast_bf16: bool  # compute capability 8.0 on: bfloat16 units, where dtype 'auto' runs the base in bfloat16


def ampere_or_later(compute_cap: str) -> bool:
    """Whether nvidia-smi's compute capability ("8.0", "9.0") is 8.0 or later, the bfloat16 rule of
    `mops_core.loading.gpu_has_fast_bf16` (which needs torch); unreported ("[N/A]") is not."""
    try:
        return float(compute_cap) >= 8
    except ValueError:
        return False


def visible_gpus(env: Mapping[str, str] | None = None) -> list[Gpu]:
    """The GPUs this machine's processes see: `nvidia-smi`'s list, narrowed by CUDA_VISIBLE_DEVICES
    (indices or UUIDs) as CUDA narrows it. Empty without an NVIDIA driver, or where torch is a CPU
    build (its version ends in +cpu): such actors could not use one. A driver too old to report the
    compute capability counts its GPUs as without bfloat16 units (a larger base: fewer actors)."""
    env = os.environ if env is None else env
    try:
        from importlib.metadata import version

        if "+cpu" in version("torch"):
            return []
        listed = None
        for fields in ("index,uuid,memory.total,compute_cap", "index,uuid,memory.total"):
            try:
                listed = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
                                        capture_output=True, text=True, timeout=30, check=True).stdout
                break
            except subprocess.CalledProcessError:
                continue  # an older driver refuses the field it does not know
        if listed is None:
            return []
        rows = [[field.strip() for field in line.split(",")] for line in listed.splitlines() if line.strip()]
        gpus = [(row[0], row[1], Gpu(int(row[2]) * 2**20, len(row) > 3 and ampere_or_later(row[3]))) for row in rows]
    except (OSError, ValueError, IndexError, subprocess.SubprocessError, ImportError):
        return []
    if "CUDA_VISIBLE_DEVICES" not in env:
        return [gpu for _, _, gpu in gpus]
    by_key = {key: gpu for index, uuid, gpu in gpus for key in (index, uuid)}
    chosen = []
    for key in env["CUDA_VISIBLE_DEVICES"].split(","):
        if key.strip() not in by_key:
            break  # CUDA stops at the first device it does not know
        chosen.append(by_key[key.strip()])
    return chosen


def actors_dtype(dtype: str, gpus: Sequence[Gpu]) -> str:
    """The dtype the actors' bases will have, as `mops_core.loading.resolve_dtype` picks it for `dtype`
    on their device: 'auto' is bfloat16 where every GPU they may get has bfloat16 units, or where
    they run on this machine's CPU and it has them; float32 otherwise."""
    if dtype != "auto":
        return dtype
    if gpus:
        return "bfloat16" if all(gpu.fast_bf16 for gpu in gpus) else "float32"
    from mops_core.loading import cpu_has_fast_bf16  # torch: after the settings are checked

    return "bfloat16" if cpu_has_fast_bf16() else "float32"


def actor_gpus(clients_per_round: int, gpus: Sequence[Gpu], *, each: int | None = None) -> float:
    """The GPU share per ClientApp actor when none is asked and this machine has GPUs: a round's
    clients spread evenly over them, side by side, a whole GPU at most (one base is never split),
    and no more actors on a GPU than four fifths of its memory holds processes of `each` bytes
    (`footprint`), the ServerApp's among them on the first GPU, where its base goes.
    Ray takes shares to four decimals: rounded down, so that the actors meant to fit do."""
    if not gpus:
        return 0.0
    per_gpu = -(-max(clients_per_round, 1) // len(gpus))
    if each:
        fits = [int(0.8 * gpu.memory) // each for gpu in gpus]
        fits[0] -= 1  # the ServerApp's base; Ray may place actors on any GPU, so the one share leaves room for it
        per_gpu = min(per_gpu, max(1, min(fits)))
    return math.floor(10_000 / per_gpu) / 10_000


def gpu_actors(gpus: Sequence[Gpu], share: float) -> int:
    """How many actors of `share` GPU each these GPUs hold, as Flower's pool counts them (Ray's
    four-decimal shares, such as 0.3333, hold their whole number)."""
    return math.floor(len(gpus) / share + 1e-6)


def actor_layout(clients_per_round: int, cpus: int, share: float, gpus: Sequence[Gpu], ray_address: str | None,
                 cores: int | None = None) -> str:
    """One line on the ClientApp actors Ray will start, as Flower's pool counts them: the defaults
    depend on the machine, so the run says what they chose."""
    each = f"{cpus} CPU{'s' if cpus > 1 else ''}" + (f" and {share:g} GPU" if share else "")
    if ray_address:
        return f"ClientApp actors: as many as the Ray cluster at {ray_address} holds, {each} each"
    actors = (cores or local_cores()) // cpus
    if share and gpus:
        actors = min(actors, gpu_actors(gpus, share))
    elif share:
        return f"ClientApp actors: as many as Ray's GPUs hold, {each} each"
    return (f"ClientApp actors: {actors} of {each}, for {clients_per_round} client{'s' if clients_per_round > 1 else ''} "
            f"a round (--client-cpus, --client-gpus to choose)")


@dataclass(frozen=True)
class ActorPlan:
    """The ClientApp actors of a run: CPUs and GPU share each, and what the run says of them."""

    cpus: int
    gpus: float
    lines: tuple[str, ...]  # printed before the run: how many actors, and why where memory decided
    warnings: tuple[str, ...] = ()


def plan_actors(clients: int, *, cores: int, memory: int | None, gpus: Sequence[Gpu], each: int | None, on_gpu: bool,
                client_cpus: int | None = None, client_gpus: float | None = None, ray_address: str | None = None) -> ActorPlan:
    """How the ClientApp actors of a round of `clients` get this machine (`cores`, `memory` free, `gpus`), each
    process holding about `each` bytes (`footprint`; None: unknown) on a GPU (`on_gpu`) or in host memory.
    `client_cpus` / `client_gpus`: what the user asked, else chosen here. Touches nothing of the machine."""
    warnings = []
    memory_bound = False  # whether the memory, not the cores or the GPUs' number, set the actors' count
    if client_gpus is None:
        client_gpus = actor_gpus(clients, gpus, each=each)
        memory_bound = client_gpus > actor_gpus(clients, gpus)
    elif client_gpus and not gpus and not ray_address:
        warnings.append(f"--client-gpus {client_gpus} asks for GPUs, but none that torch could use is visible here (nvidia-smi "
                        "lists none, CUDA_VISIBLE_DEVICES hides them, torch is a CPU build, or device='cpu'): where Ray sees "
                        "none either, the simulation stops with an empty actor pool")
    if client_cpus is None and client_gpus:  # the GPU shares bound the actors, and the GPUs' memory their bases
        actors = min(clients, gpu_actors(gpus, client_gpus)) if gpus else clients
        client_cpus = actor_cpus(actors, ray_address, cores=cores)
    elif client_cpus is None:
        client_cpus = actor_cpus(clients, ray_address, each=each, memory=memory, cores=cores)
        memory_bound = client_cpus > actor_cpus(clients, ray_address, cores=cores)
    lines = [actor_layout(clients, client_cpus, client_gpus, gpus, ray_address, cores=cores)]
    if memory_bound:
        where = "a GPU's memory holds, the ServerApp's on the first" if on_gpu else "the memory holds beside the ServerApp's"
        lines.append(f"  as many as {where}: about {each / 1e9:.1f} GB a process (the base, an activation cache of up to "
                     "activation-cache-mb, the rest)")
    return ActorPlan(client_cpus, client_gpus, tuple(lines), tuple(warnings))
