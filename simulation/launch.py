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
import contextlib
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mops_core.config import Settings
from mops_core.parsing import SettingsError

from .actors import actors_dtype, available_memory, base_bytes, base_parameters, footprint, local_cores, plan_actors, visible_gpus

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


def local_superlinks(flwr_home: Path) -> dict[int, str]:
    """The local SuperLinks running on `flwr_home`'s state database: pid -> command line."""
    marker = f"--database {flwr_home}/local-superlink/state.db"
    return {pid: cmdline for pid, cmdline in command_lines() if "flower-superlink" in cmdline and marker in cmdline}


def stop_local_superlink(flwr_home: Path, control_port: str, *, grace: float = 10.0) -> None:
    """`flwr run` leaves its local SuperLink running: stop the one this launch started, found by its state
    database and its control port, and what it started (SuperExec, the simulation, Ray), which a run
    stopped midway leaves working in sessions of their own. Another launch's SuperLink on the same
    FLWR_HOME (a benchmark running beside a demo) is left alone: stopping it would end that run."""
    ours = re.compile(rf"--control-api-address \S*:{re.escape(str(control_port))}(\s|$)")
    for pid, cmdline in local_superlinks(flwr_home).items():
        if ours.search(cmdline):
            stop_tree(pid, grace)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first found, then theirs), from /proc."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = proc.read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])  # after "(comm) state": the parent's pid
        children.setdefault(parent, []).append(int(proc.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop_tree(pid: int, grace: float) -> None:
    """SIGTERM to `pid` and everything below it; SIGKILL to what is still there after `grace` seconds."""
    family = [pid, *descendants(pid)]
    for member in family:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (alive := [m for m in family if Path(f"/proc/{m}").exists() and not zombie(m)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for member in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 5  # SIGKILL is delivered when the process next runs
    while any(Path(f"/proc/{m}").exists() and not zombie(m) for m in alive) and time.monotonic() < deadline:
        time.sleep(0.05)


def zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


@contextlib.contextmanager
def stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM (`kill`, a scheduler ending a job) unwinds the launch as Ctrl-C does, so that its
    SuperLink and what that started are stopped too, not left computing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    if others := local_superlinks(flwr_home):
        print(f"warning: another local SuperLink (pid {', '.join(map(str, others))}) runs on {flwr_home}: runs sharing one "
              "FLWR_HOME share its state database; give this one --flwr-home DIR of its own", file=sys.stderr)
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
    with stopped_by_sigterm():
        try:
            return subprocess.run(command, env=full_env, cwd=PROJECT, timeout=timeout).returncode
        finally:
            stop_local_superlink(flwr_home, full_env["FLWR_LOCAL_CONTROL_API_PORT"])


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
