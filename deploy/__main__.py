"""`python -m deploy`: certificates, SuperNode keys, and a whole TLS + authenticated deployment on loopback.

    python -m deploy certs --out deploy-state/certs [--host my.server.org --host 10.0.0.5]
    python -m deploy keys --out deploy-state/keys --nodes 2
    python -m deploy up --nodes 2 [--root deploy-state] [--run-config "num-server-rounds=2 ..."]
    python -m deploy wheelhouse --out docker/wheelhouse [--torch cuda]

`up` makes what is missing (CA, server certificate, one key pair per SuperNode), starts the
SuperLink (TLS, node authentication, state database), registers every node's public key,
starts the SuperNodes (partition i of N each), submits the app with `flwr run`, streams its
log, and stops everything. Each command is printed as it is run; logs are in ROOT/logs.
`wheelhouse` fills a folder with every wheel the Docker images install, for a build that
reaches no package index (docker/Dockerfile, build argument WHEELHOUSE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .certs import make_certificates, make_supernode_keys
from .local import Deployment
from .wheelhouse import TORCH_BUILDS, fill_wheelhouse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    certs = sub.add_parser("certs", help="a CA and a SuperLink certificate signed by it")
    certs.add_argument("--out", type=Path, default=Path("deploy-state/certs"))
    certs.add_argument("--host", action="append", help="name or address in the certificate (repeatable; default localhost, 127.0.0.1, ::1)")
    keys = sub.add_parser("keys", help="one EC P-384 OpenSSH key pair per SuperNode")
    keys.add_argument("--out", type=Path, default=Path("deploy-state/keys"))
    keys.add_argument("--nodes", type=int, default=2)
    up = sub.add_parser("up", help="certs, keys, SuperLink, registration, SuperNodes and one run, all on loopback")
    up.add_argument("--root", type=Path, default=Path("deploy-state"))
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--run-config", action="append", default=[], help="app settings, as for `flwr run --run-config`")
    wheels = sub.add_parser("wheelhouse", help="every wheel the images install, for a build without a package index")
    wheels.add_argument("--out", type=Path, default=Path("docker/wheelhouse"))
    wheels.add_argument("--torch", choices=TORCH_BUILDS, default="cpu", help="the torch build (default cpu)")
    wheels.add_argument("--torch-index", help="the package index torch comes from: PyTorch's index of that build (default: pip's configuration, which must then give that build)")
    args = parser.parse_args(argv)

    if args.command == "certs":
        for what, path in make_certificates(args.out, args.host).items():
            print(f"{what}: {path}")
        return 0
    if args.command == "keys":
        for name, (private, public) in make_supernode_keys(args.out, [f"node-{i}" for i in range(args.nodes)]).items():
            print(f"{name}: private {private}, public {public}")
        return 0

    if args.command == "wheelhouse":
        try:
            found = fill_wheelhouse(args.out, torch=args.torch, torch_index=args.torch_index)
        except (RuntimeError, ValueError) as error:
            print(f"wheelhouse: {error}", file=sys.stderr)
            return 2
        print(f"{len(found)} wheels, {sum(p.stat().st_size for p in found) / 2**20:.0f} MiB in {args.out}")
        return 0

    nodes = [f"node-{i}" for i in range(args.nodes)]
    deployment = Deployment(args.root.resolve())
    deployment.prepare(nodes)
    settings = {"min-available-nodes": args.nodes, "out-dir": str(args.root.resolve() / "run")}
    try:
        deployment.start_superlink()
        for node in nodes:
            registered = deployment.register(node)
            if registered.returncode != 0:
                print(registered.stdout + registered.stderr, file=sys.stderr)
                return registered.returncode
        for i, node in enumerate(nodes):
            deployment.start_supernode(node, i, len(nodes))
        done = deployment.run(settings, extra_run_config=args.run_config, timeout=24 * 3600)
        print(done.stdout[-20000:], done.stderr[-5000:], sep="\n")
        return done.returncode
    finally:
        deployment.stop_all()


if __name__ == "__main__":
    sys.exit(main())
