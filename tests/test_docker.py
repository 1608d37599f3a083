"""The Docker files, checked without a Docker engine (none runs here or in CI)."""

import re
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
        assert service["build"]["args"]["TORCH_INDEX"].startswith("${TORCH_INDEX")
    caches = [v.split(":")[0] for s in services.values() for v in s.get("volumes", []) if v.endswith(":/cache")]
    assert len(caches) == len(set(caches)) == len(nodes) + 1  # no cache is shared
    assert {"state", *caches} <= set(COMPOSE["volumes"])


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


def test_dockerfile_installs_torch_first_and_copies_what_exists():
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", DOCKERFILE, re.M))
    assert {"base", "superlink", "supernode"} <= targets
    assert DOCKERFILE.index('"torch==${TORCH_VERSION}"') < DOCKERFILE.index('pip install ".')
    for source in re.findall(r"^COPY (\S+)", DOCKERFILE, re.M):
        assert (ROOT / source).exists(), source
