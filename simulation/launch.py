"""Run the Flower app as a Ray-backed simulation through `flwr run`, the way a user does.

    python -m simulation.launch [--supernodes 100] [--client-cpus N] [--client-gpus SHARE] \
        [--run-config "method='fedprompt' num-server-rounds=5"] [--ray-address HOST:6379] ...

It checks the settings first (a wrong key fails in a fraction of a second, before Ray starts),
writes the local SuperLink connection into `$FLWR_HOME/config.toml` (default `./.flwr`), runs
`flwr run . --stream` with the simulation's shape as `--federation-config` (number of
supernodes, resources per ClientApp actor) and runtime dependency installation disabled (it
would replace the CPU torch with a CUDA build), on a local SuperLink of its own (fresh ports,
so that a SuperLink another run left behind never gets the run), and stops that SuperLink
once the run is over. It sets `MOPS_DATA_DIR` to the project's `../shared/data`, so that the
apps find the data wherever the launcher is started from.

With `--ray-address` the simulation runs on an existing Ray cluster instead of a Ray of its own:
Flower's Ray backend calls `ray.init()`, which joins the cluster `RAY_ADDRESS` names, so the
ClientApp actors spread over every node's CPUs (or GPUs). The launcher's SuperLink is fresh, so
it inherits that variable; the run's actors end with the run and the cluster stays up.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from dataclasses import dataclass
from typing import Any, NamedTuple

from mops_core.config import Settings
from mops_core.parsing import SettingsError

PROJECT = Path(__file__).resolve().parent.parent


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config(values: Mapping[str, Any]) -> str:
    """Settings as one `--run-config` string: `key=value` pairs with TOML values."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def write_connection(flwr_home: Path) -> Path:
    """A `local` SuperLink connection: `flwr run` starts a local SuperLink in simulation mode."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    return path


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


def cpus_arg(text: str) -> int:
    """`--client-cpus`: a whole number of CPUs, at least one (Ray starts no actor on none)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of CPUs, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: an actor needs at least one CPU")
    return value


def gpus_arg(text: str) -> float:
    """`--client-gpus`: what Ray schedules, a share of one GPU (0 to 1) or a whole number of them."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs, got {text!r}") from None
    if not 0 <= value < math.inf or (value > 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"{text}: a share of one GPU (0 to 1) or a whole number of GPUs, as Ray schedules them")
    return value


def federation_config(supernodes: int, client_cpus: int, client_gpus: float) -> str:
    return (
        f"num-supernodes={supernodes} client-resources-num-cpus={client_cpus} "
        f"client-resources-num-gpus={float(client_gpus)}"
    )


def command_lines() -> Iterator[tuple[int, str]]:
    """(pid, command line with spaces between its arguments) of every process /proc lists (none elsewhere)."""
    proc_dir = Path("/proc")
    for proc in proc_dir.iterdir() if proc_dir.is_dir() else ():
        if not proc.name.isdigit():
            continue
        try:
            yield int(proc.name), (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue


def stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves its local SuperLink running; find it by its database path and stop it."""
    marker = f"--database {flwr_home}/local-superlink/state.db"
    for pid, cmdline in command_lines():
        if "flower-superlink" in cmdline and marker in cmdline:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def with_shared_data(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with MOPS_DATA_DIR at the project's ../shared/data, unless it names one already.

    The app may run from a copy elsewhere (a FAB, a git worktree), where ../shared/data would not be found.
    """
    data = PROJECT.parent / "shared" / "data"
    if "MOPS_DATA_DIR" not in env and data.is_dir():
        return {**env, "MOPS_DATA_DIR": str(data)}
    return dict(env)


def launch(
    overrides: Mapping[str, Any] | None = None,
    *,
    extra_run_config: Sequence[str] = (),
    supernodes: int = 100,
    client_cpus: int | None = None,
    client_gpus: float | None = None,
    flwr_home: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
    ray_address: str | None = None,
) -> int:
    """Run the app once; returns `flwr run`'s exit code. `client_gpus` None: `actor_gpus`, a share
    of this machine's GPUs when the run may use them (0 on a Ray cluster, whose GPUs these are not).
    `client_cpus` None: `actor_cpus` for the actors of a round of these settings."""
    from flwr.common.config import parse_config_args

    settings = run_settings({**(overrides or {}), **parse_config_args(list(extra_run_config))})
    clients = max(int(supernodes * settings.federated.fraction_train), 1)  # as the server samples
    gpus = [] if ray_address or settings.model.device == "cpu" else visible_gpus()
    # The base's size bounds the actors on this machine only (a Ray cluster's are not its); where known, since
    # its dtype may need torch, imported only then.
    parameters = None if ray_address else base_parameters(settings.model.model)
    on_gpu = bool(gpus) and client_gpus != 0
    base = base_bytes(parameters, actors_dtype(settings.model.dtype, gpus if on_gpu else [])) if parameters else None
    each = base and footprint(base, settings, on_gpu=on_gpu)
    plan = plan_actors(clients, cores=local_cores(), memory=available_memory(), gpus=gpus, each=each, on_gpu=on_gpu,
                       client_cpus=client_cpus, client_gpus=client_gpus, ray_address=ray_address)
    for warning in plan.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    flwr_home = Path(flwr_home or os.environ.get("FLWR_HOME") or PROJECT / ".flwr").resolve()
    write_connection(flwr_home)
    bin_dir = Path(sys.executable).parent
    full_env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # An actor without a GPU share sees no GPU, where there are any: else each would put its base on
        # one that Ray does not count. Elsewhere Ray's advice, which silences its warning.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "1" if gpus and not plan.gpus else "0",
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        **({"RAY_ADDRESS": ray_address} if ray_address else {}),
        **(env or {}),
    }
    full_env = with_shared_data({**full_env, **own_superlink_ports(full_env)})
    command = [
        str(bin_dir / "flwr"), "run", str(PROJECT), "--stream",
        "--federation-config", federation_config(supernodes, plan.cpus, plan.gpus),
    ]
    if overrides:
        command += ["--run-config", run_config(overrides)]
    for extra in extra_run_config:
        command += ["--run-config", extra]
    print("\n".join(plan.lines))
    print("$ " + shlex.join(command), flush=True)
    try:
        return subprocess.run(command, env=full_env, cwd=PROJECT, timeout=timeout).returncode
    finally:
        stop_local_superlink(flwr_home)


def app_config() -> dict[str, Any]:
    """The app's run config as `flwr run .` starts from it: pyproject.toml's [tool.flwr.app.config]."""
    return tomllib.loads((PROJECT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def run_settings(given: Mapping[str, Any]) -> Settings:
    """The settings a run gets: pyproject.toml's app config, overridden by `given` (a wrong key or value raises SettingsError)."""
    return Settings.from_flat({**app_config(), **given}, context="--run-config")


def check_run(run_config: Sequence[str], out_dir: str | None, supernodes: int) -> tuple[dict[str, Any], Settings]:
    """The settings this run will have (and the values the launcher adds: its results folder, the nodes
    to wait for), checked before anything starts.

    A wrong key or value raises SettingsError naming it, and a mistake that shows only in the data
    (a task it does not hold, a field the column mapping names, a malformed file) DataError, both in
    a fraction of a second. `--out-dir` and a run-config `out-dir` must agree: the launcher reads the
    results from the folder the ServerApp writes to.
    """
    from flwr.common.config import parse_config_args

    try:
        given = parse_config_args(list(run_config))
    except Exception as exc:  # click's own exception, or a ValueError from Flower's parser
        raise SettingsError(f"--run-config: {getattr(exc, 'message', None) or exc}") from None
    if "out-dir" in given and out_dir is not None and Path(str(given["out-dir"])).resolve() != Path(out_dir).resolve():
        raise SettingsError(f"--out-dir {out_dir} and the run config's out-dir {given['out-dir']} disagree; give one of them")
    out = Path(str(given.get("out-dir", out_dir or PROJECT / "runs" / "federated"))).resolve()
    values = {"out-dir": str(out), "min-available-nodes": supernodes}
    settings = run_settings({**values, **given})
    check_data(settings)
    return values, settings


def check_data(settings: Settings) -> None:
    """Read the run's data here, as its apps will find it (the project's ../shared/data among the places
    looked in): the records of the run's tasks and their list, without torch. Data that only the hub
    holds is left to the apps, with a warning."""
    from mops_core.data import PRESETS, load_records, missing_local_copy, names_a_path, run_tasks  # after the settings: no torch

    data = settings.data
    if note := missing_local_copy(data):
        print(f"warning: {note}", file=sys.stderr)
        return
    if data.dataset in PRESETS or names_a_path(data.dataset):  # a hub id: the apps read it
        load_records(data)
        run_tasks(data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def own_superlink_ports(env: Mapping[str, str]) -> dict[str, str]:
    """Ports for a local SuperLink of this run's own, unless the caller chose them.

    `flwr run` hands a run to whatever local SuperLink answers on its port, even one that an
    earlier run left behind under another FLWR_HOME, with that SuperLink's environment.
    """
    ports = {}
    for name in ("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"):
        if name not in env:
            ports[name] = str(free_port())
    return ports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=100, help="simulated clients (default 100)")
    parser.add_argument("--client-cpus", type=cpus_arg, help="CPUs (threads) per ClientApp actor (default: the cores "
                        "shared among one round's clients, at least 1; 2 on a Ray cluster)")
    parser.add_argument("--client-gpus", type=gpus_arg, help="GPUs per ClientApp actor, e.g. 0.25 (default: where torch "
                        "sees GPUs, a round's clients spread over them as their memory allows; 0 on a Ray cluster)")
    parser.add_argument("--flwr-home", type=Path, help="Flower's home for this run (default ./.flwr)")
    parser.add_argument("--out-dir", help="where results go (default runs/federated; or out-dir in --run-config)")
    parser.add_argument("--run-config", action="append", default=[], help="settings, as for `flwr run --run-config`")
    parser.add_argument("--ray-address", help="run on this existing Ray cluster (HOST:PORT of its head, as `ray start --head` "
                        "prints) instead of a local Ray started for the run")
    args = parser.parse_args(argv)
    from mops_core.data import DataError

    try:
        values, settings = check_run(args.run_config, args.out_dir, args.supernodes)
    except (SettingsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(settings.federated.out_dir)
    before = finished_rounds(out)
    code = launch(
        values,
        extra_run_config=args.run_config,
        supernodes=args.supernodes,
        client_cpus=args.client_cpus,
        client_gpus=args.client_gpus,
        flwr_home=args.flwr_home,
        ray_address=args.ray_address,
    )
    after = finished_rounds(out)
    if code == 0 and (after is None or (after == before and not settings.federated.resume)):
        # `flwr run` exits 0 even when the ServerApp raised (it prints "Exit Code: 700"): say so.
        print(f"error: the run wrote no new round to {out}/results.json; see the ServerApp's error above", file=sys.stderr)
        return 1
    return code


def finished_rounds(out_dir: Path) -> int | None:
    """The last round results.json in `out_dir` holds, None when there is none."""
    try:
        rounds = json.loads((out_dir / "results.json").read_text()).get("rounds") or []
    except (OSError, ValueError):
        return None
    return rounds[-1]["round"] if rounds else None


if __name__ == "__main__":
    sys.exit(main())
