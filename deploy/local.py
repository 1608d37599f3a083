"""A real deployment, every process on this machine: what runs on many machines, on loopback.

    SuperLink   flower-superlink with TLS (CA-signed certificate), --enable-supernode-auth,
                a --database file (nodes and runs survive a restart), runtime dependency
                installation disabled (the CPU torch stays)
    register    flwr supernode register NODE.pub  (only registered keys may connect)
    SuperNodes  flower-supernode with its private key, the CA, and --node-config naming its
                data partition
    run         flwr run . <connection> --stream

Each process gets its own FLWR_HOME, as separate machines would, and every command is
printed as it is run. `python -m deploy up` drives it end to end; tests use the pieces.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server import protocol
from simulation.launch import PROJECT, command_lines, free_port, run_config, stop_tree

from .certs import make_certificates, make_supernode_keys

CONNECTION = "deploy"


def wait_for_port(port: int, timeout: float = 60.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before port {port} opened")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Deployment:
    root: Path
    port: int = field(default_factory=free_port)  # the SuperLink's one HTTPS port (Fleet, Control, Runtime APIs)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def keys(self) -> Path:
        return self.root / "keys"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def database(self) -> Path:
        return self.root / "state" / "superlink.db"

    def home(self, who: str) -> Path:
        return self.root / "flwr-home" / who

    def prepare(self, nodes: Sequence[str]) -> None:
        """Certificates and node keys, made once (kept on later calls, like a real PKI)."""
        if not (self.certs / "ca.crt").exists():
            make_certificates(self.certs)
        missing = [n for n in nodes if not (self.keys / f"{n}.pub").exists()]
        make_supernode_keys(self.keys, missing)
        cli_home = self.home("cli")
        cli_home.mkdir(parents=True, exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def _env(self, who: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "FLWR_HOME": str(self.home(who)),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        data = PROJECT.parent / "shared" / "data"
        if "MOPS_DATA_DIR" not in env and data.is_dir():
            env["MOPS_DATA_DIR"] = str(data)
        return {**env, **(extra or {})}

    def _spawn(self, who: str, command: list[str], *, home: str | None = None,
               env: Mapping[str, str] | None = None) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home(home or who).mkdir(parents=True, exist_ok=True)
        print("$ " + shlex.join(command), flush=True)
        with open(self.logs / f"{who}.log", "ab") as log:  # the child keeps its own handle
            # A session of its own: stopping it stops what it started (the SuperLink's ServerApp), as a machine would.
            process = subprocess.Popen(command, env=self._env(home or who, env), stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT,
                                       start_new_session=True)
        self.processes[who] = process
        return process

    def start_superlink(self, *, auth: bool = True) -> subprocess.Popen:
        self.database.parent.mkdir(parents=True, exist_ok=True)
        command = [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.certs / "ca.crt"),
            "--ssl-certfile", str(self.certs / "server.pem"),
            "--ssl-keyfile", str(self.certs / "server.key"),
            "--database", str(self.database),
            "--host", "127.0.0.1", "--port", str(self.port),
            "--control-api-address", f"127.0.0.1:{free_port()}",
            "--disable-runtime-dependency-installation",
        ] + (["--enable-supernode-auth"] if auth else [])
        process = self._spawn("superlink", command)
        wait_for_port(self.port, process=process)
        return process

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """The `flwr` CLI against this deployment's SuperLink connection."""
        command = ["flwr", *args]
        print("$ " + shlex.join(command), flush=True)
        return subprocess.run(command, env=self._env("cli"), cwd=PROJECT, capture_output=True, text=True, timeout=timeout)

    def _listing(self, *args: str) -> dict:
        done = self.flwr(*args, CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        return json.loads(done.stdout)

    def nodes(self) -> list[dict]:
        """What the SuperLink knows of the SuperNodes (`flwr supernode ls`): ids and status."""
        return self._listing("supernode", "ls")["nodes"]

    def runs(self) -> list[dict]:
        """The runs the SuperLink holds (`flwr ls`)."""
        return self._listing("ls")["runs"]

    def wait_online(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while sum(n["status"] == "online" for n in self.nodes()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout:.0f} s")
            time.sleep(1.0)

    def register(self, node: str) -> subprocess.CompletedProcess:
        return self.flwr("supernode", "register", str(self.keys / f"{node}.pub"), CONNECTION)

    def start_supernode(
        self, node: str, partition_id: int, num_partitions: int, *, key: bool = True, ca: bool = True,
        insecure: bool = False, node_config: str = "", max_retries: int | None = 3, env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen:
        """A SuperNode holding a partition of the run's dataset, or what `node_config` says (e.g. its own data-file);
        `env`: variables of its own (a straggler's delay, client/app.py)."""
        command = ["flower-supernode", "--superlink", f"127.0.0.1:{self.port}", "--port", str(free_port())]
        command += ["--insecure"] if insecure else (["--root-certificates", str(self.certs / "ca.crt")] if ca else [])
        if key:
            command += ["--auth-supernode-private-key", str(self.keys / node)]
        node_config = node_config or protocol.node_config_text(partition_id, num_partitions)
        command += ["--node-config", node_config] + ([] if max_retries is None else ["--max-retries", str(max_retries)])
        return self._spawn(node, command, env=env)

    def restart_supernode(self, node: str, partition_id: int, num_partitions: int, *, within: float = 300.0,
                          stop: threading.Event | None = None, **options) -> None:
        """Start a SuperNode again, as a supervisor would (systemd Restart=on-failure, Docker restart: on-failure).

        The SuperLink refuses a node whose previous process it still counts as online ([code: 2004])
        until that one misses its heartbeats; the supervisor starts it again until it stays up, or
        until `stop` is set (the node then left stopped).
        """
        deadline = time.monotonic() + within
        while True:
            process = self.start_supernode(node, partition_id, num_partitions, max_retries=None, **options)
            try:
                process.wait(timeout=15.0)  # a refused node exits within seconds
            except subprocess.TimeoutExpired:
                return  # it stays up: activated
            if time.monotonic() > deadline:
                raise TimeoutError(f"{node} was refused for {within:.0f} s: {self.log(node)[-500:]}")
            if stop is None:
                time.sleep(5.0)
            elif stop.wait(5.0):
                return

    def run(
        self, settings: Mapping[str, Any], *, extra_run_config: Sequence[str] = (), timeout: float = 900
    ) -> subprocess.CompletedProcess:
        command = ["flwr", "run", str(PROJECT), CONNECTION, "--stream", "--run-config", run_config(settings)]
        for extra in extra_run_config:
            command += ["--run-config", extra]
        print("$ " + shlex.join(command), flush=True)
        return subprocess.run(command, env=self._env("cli"), cwd=PROJECT, timeout=timeout, capture_output=True, text=True)

    def submit(self, settings: Mapping[str, Any]) -> subprocess.Popen:
        """`flwr run` in the background, its output in logs/run.log (to act while a round runs): this run's only."""
        (self.logs / "run.log").unlink(missing_ok=True)
        return self._spawn("run", ["flwr", "run", str(PROJECT), CONNECTION, "--stream", "--run-config", run_config(settings)], home="cli")

    def stop(self, who: str, *, kill: bool = False) -> None:
        """Stop a process and everything it started; `kill`: at once (SIGKILL), as a crashed machine stops."""
        process = self.processes.pop(who, None)
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL if kill else signal.SIGTERM)
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:  # the group is gone already
            pass

    def stop_all(self) -> None:
        for who in [w for w in self.processes if w != "superlink"] + ["superlink"]:
            self.stop(who)
        # What the SuperLink started in a session of its own (the ServerApp) outlives its process group:
        # every process left that names this deployment's folder.
        for pid, cmdline in command_lines():
            if str(self.root) in cmdline and pid != os.getpid():
                stop_tree(pid, grace=5.0)

    def log(self, who: str) -> str:
        path = self.logs / f"{who}.log"
        return path.read_text(errors="replace") if path.exists() else ""
