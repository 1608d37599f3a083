"""What the main job's processes hold in memory, against what the launcher assumes they hold.

    python benchmarks/process_memory.py [--rounds 3] [launcher options, e.g. --run-config "model='DIR'"]

Runs the main job (`python -m simulation.launch` with the given options, in a Flower home and
results folder of its own) and reads, twice a second, the resident memory of its ServerApp process
and of every ClientApp actor from /proc (Linux). It prints each one's peak (VmHWM, pages of mapped
files included) and its peak of anonymous memory, beside `simulation.actors.footprint`: the bytes
per process by which the launcher decides how many actors fit on this machine (the base in the
dtype the actors get, the activation cache at its bound, the rest). A peak above the estimate
means the launcher could start more actors than the memory holds. Host memory only: on a GPU the
actors' bases are in the GPU's memory, which this does not read.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulation.actors import (  # noqa: E402
    PROCESS_BYTES, actors_dtype, base_bytes, base_parameters, config_parameters, footprint,
)
from simulation.launch import PROJECT, command_lines, run_settings, with_shared_data  # noqa: E402

KINDS = {"ClientAppActor": "ClientApp actor", "flwr-simulation": "ServerApp (flwr-simulation)"}


def processes() -> dict[int, str]:
    """The run's processes by pid: the ServerApp's and each ClientApp actor's."""
    return {pid: kind for pid, cmdline in command_lines() for marker, kind in KINDS.items() if marker in cmdline}


def memory(pid: int) -> tuple[int, int]:
    """(peak resident, current anonymous) bytes of a process."""
    status = dict(re.findall(r"(\w+):\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()))
    return int(status["VmHWM"]) * 1024, int(status["RssAnon"]) * 1024


def base_size(settings) -> int:
    """The base's bytes in the dtype CPU actors get, from its config (the embedded GGUF's read through transformers)."""
    parameters = base_parameters(settings.model.model)
    if parameters is None:
        from transformers import AutoConfig

        from mops_core.loading import embedded_gguf

        folder, name = embedded_gguf()
        parameters = config_parameters(AutoConfig.from_pretrained(folder, gguf_file=name).to_dict())
    return base_bytes(parameters, actors_dtype(settings.model.dtype, []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="num-server-rounds")
    args, launcher = parser.parse_known_args()
    given = [launcher[i + 1] for i, arg in enumerate(launcher[:-1]) if arg == "--run-config"]
    from flwr.common.config import parse_config_args

    settings = run_settings(parse_config_args(given))
    peaks: dict[int, list] = {}  # pid -> [kind, peak resident, peak anonymous]
    done = threading.Event()

    def watch():
        while not done.is_set():
            for pid, kind in processes().items():
                try:
                    resident, anonymous = memory(pid)
                except (OSError, KeyError):
                    continue
                seen = peaks.setdefault(pid, [kind, 0, 0])
                seen[1], seen[2] = max(seen[1], resident), max(seen[2], anonymous)
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with tempfile.TemporaryDirectory(prefix="mops-memory-") as tmp:
        command = [sys.executable, "-m", "simulation.launch", "--out-dir", f"{tmp}/results", "--flwr-home", f"{tmp}/flwr",
                   "--run-config", f"num-server-rounds={args.rounds}", *launcher]
        code = subprocess.run(command, cwd=PROJECT, env=with_shared_data(os.environ)).returncode
    done.set()
    watcher.join()

    base = base_size(settings)
    estimate = footprint(base, settings, on_gpu=False)
    gb = 1e9
    print(f"\nthe launcher's estimate per process: {estimate / gb:.2f} GB (base {base / gb:.2f} GB in "
          f"{actors_dtype(settings.model.dtype, [])}, activation cache up to {(estimate - base - PROCESS_BYTES) / gb:.2f} GB, "
          f"the rest {PROCESS_BYTES / gb:.2f} GB)")
    print(f"{'process':30s} {'pid':>8s} {'peak resident':>14s} {'peak anonymous':>15s} {'peak / estimate':>16s}")
    for pid, (kind, resident, anonymous) in sorted(peaks.items(), key=lambda item: item[1][0]):
        print(f"{kind:30s} {pid:8d} {resident / gb:11.2f} GB {anonymous / gb:12.2f} GB {resident / estimate:15.2f}x")
    if not peaks:
        print("no ServerApp or ClientApp process was seen (not Linux, or the run ended before it started one)")
    return code


if __name__ == "__main__":
    sys.exit(main())
