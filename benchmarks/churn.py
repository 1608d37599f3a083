"""Churn soak: a real federation on 127.0.0.1 whose nodes die, restart and lag, and whose server dies once.

    python benchmarks/churn.py                       # 20 rounds, 6 SuperNodes, 4 a round (about 30-40 minutes)
    python benchmarks/churn.py --rounds 6 --nodes 4 --kill-server-at 3 --time-limit 900

A SuperLink with TLS and node authentication, `--nodes` SuperNodes with their keys (one of them a
straggler: it sleeps `--straggle` seconds in every train handler), the tests' tiny LLaMA and toy
data; the run asks for `--rounds` rounds of `--per-round` nodes with `round-deadline` and
`min-replies` set as an operator would. Meanwhile a seeded chaos loop kills a random SuperNode
(SIGKILL, every `--chaos-every` seconds on average) and restarts it a little later, as a
supervisor would; at round `--kill-server-at` the SuperLink and its ServerApp are killed, the
SuperLink started again on its database and the run submitted again with `resume=true`.

It prints each round as it is recorded (seconds, replies in, dropped and why, why it ended) and
at the end: rounds completed, the longest round against what the deadline rule allows plus one
heartbeat period, nodes killed and restarted, whether each round is recorded exactly once and
the final checkpoint loads. Bounded by `--time-limit`; it stops everything it started, and
writes the summary to `<out>/churn.json`. Exit status 0 only if every check holds.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the tests' tiny LLaMA and toy data

from deploy.local import Deployment  # noqa: E402
from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL  # noqa: E402

from client.app import STRAGGLE_ENV  # noqa: E402

def tiny_world(folder: Path) -> tuple[Path, Path]:
    """The tests' tiny pretrained LLaMA saved as a local model, and the toy Dolly data (made once per folder)."""
    from helpers import pretrained_tiny_base, tiny_tokenizer, toy_records, write_dolly

    from mops_core.data import TASKS

    model, data = folder / "tiny-llama", folder / "data"
    if not (model / "config.json").exists():
        import torch

        # One thread, as in the tests: the tiny model gains nothing from a second, which stalls every op when
        # other work holds the cores.
        torch.set_num_threads(1)
        tokenizer = tiny_tokenizer()
        pretrained_tiny_base(tokenizer).save_pretrained(model)
        tokenizer.save_pretrained(model)
    if not data.exists():
        write_dolly(data, toy_records(TASKS["dolly"], 30))
    return model, data


def run_settings(args: argparse.Namespace, model: Path, data: Path, out: Path) -> dict:
    from helpers import tiny_run_settings

    return tiny_run_settings(model, data, out / "cache", {
        "experts": 7, "local-steps": args.local_steps, "num-server-rounds": args.rounds, "fraction-evaluate": 0.0,
        # per-round of the nodes connected; a round samples among those that are there
        "fraction-train": round(args.per_round / args.nodes, 4), "min-available-nodes": args.per_round - 1,
        "round-deadline": args.deadline, "min-replies": args.min_replies, "round-timeout": args.round_timeout,
        "out-dir": str(out / "run"),
    })


class Chaos(threading.Thread):
    """Kills a random SuperNode now and then (SIGKILL) and restarts it as a supervisor would; seeded."""

    def __init__(self, deployment: Deployment, nodes: list[str], straggler: str, every: float, seed: int, straggle: float):
        super().__init__(daemon=True)
        self.d, self.nodes, self.straggler, self.every, self.straggle = deployment, nodes, straggler, every, straggle
        self.rng = random.Random(seed)
        self.stopping = threading.Event()
        self.paused = threading.Event()  # while the server is down and up again
        self.killed = self.restarted = 0
        self.events: list[str] = []

    def start_node(self, node: str, restart: bool = False) -> None:
        env = {STRAGGLE_ENV: str(self.straggle)} if node == self.straggler else None
        index = self.nodes.index(node)
        if restart:
            self.d.restart_supernode(node, index, len(self.nodes), env=env, stop=self.stopping)
        else:
            self.d.start_supernode(node, index, len(self.nodes), max_retries=None, env=env)

    def run(self) -> None:
        while not self.stopping.wait(self.rng.expovariate(1.0 / self.every)):
            if self.paused.is_set():
                continue
            node = self.rng.choice(self.nodes)
            self.d.stop(node, kill=True)
            self.killed += 1
            self.events.append(f"{time.strftime('%H:%M:%S')} killed {node}")
            print(f"  chaos: killed {node}", flush=True)
            if self.stopping.wait(self.rng.uniform(0.0, 20.0)):
                return
            try:
                self.start_node(node, restart=True)
                if self.stopping.is_set():  # the soak ended while it came back: leave nothing running
                    self.d.stop(node)
                    return
                self.restarted += 1
                self.events.append(f"{time.strftime('%H:%M:%S')} restarted {node}")
                print(f"  chaos: restarted {node}", flush=True)
            except TimeoutError as exc:
                print(f"  chaos: {node} could not come back: {exc}", flush=True)


def round_line(row: dict) -> str:
    replies = row.get("replies") or {}
    dropped = [f"node {n} {why}" for why in ("gone", "late") for n in replies.get(why, [])]
    return (f"round {row['round']:>3}: {row.get('seconds', 0.0):6.1f} s, replies {replies.get('received', '-')}/"
            f"{replies.get('awaited', '-')} accepted {row.get('accepted', '-')}, ended {replies.get('ended', '-')}"
            + (f", dropped {', '.join(dropped)}" if dropped else "") + (f", {row['failed']} failed" if row.get("failed") else ""))


def over_the_rule(row: dict) -> bool:
    """Whether a round waited longer than its deadline (as the rule stood when it ended) plus one heartbeat interval."""
    replies = row.get("replies") or {}
    return replies.get("deadline") is not None and replies["seconds"] > replies["deadline"] + HEARTBEAT_DEFAULT_INTERVAL


def soak(args: argparse.Namespace) -> dict:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model, data = tiny_world(out)
    nodes = [f"node-{i}" for i in range(args.nodes)]
    d = Deployment(out / "deploy")
    d.prepare(nodes)
    settings = run_settings(args, model, data, out)
    results = Path(settings["out-dir"]) / "results.json"
    started = time.monotonic()
    chaos = Chaos(d, nodes, nodes[-1], args.chaos_every, args.seed, args.straggle)
    shown: set[int] = set()
    server_killed = interrupted = False

    def show_rounds() -> list[dict]:
        try:
            rows = json.loads(results.read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            return []
        for row in rows:
            if row["round"] not in shown and row["round"] > 0:
                shown.add(row["round"])
                print(f"{time.monotonic() - started:7.0f} s  {round_line(row)}", flush=True)
        return rows

    try:
        d.start_superlink()
        for node in nodes:
            d.register(node)  # refused, harmlessly, for a key this database holds already
            chaos.start_node(node)
        d.wait_online(args.nodes)
        run = d.submit(settings)
        chaos.start()
        while True:
            rows = show_rounds()
            last = rows[-1]["round"] if rows else -1
            if last >= args.rounds:
                break
            if time.monotonic() - started > args.time_limit:
                print(f"time limit of {args.time_limit:.0f} s reached at round {last}", flush=True)
                break
            if not server_killed and args.kill_server_at and last >= args.kill_server_at:
                server_killed = True
                chaos.paused.set()
                print(f"  chaos: killing the SuperLink and its ServerApp after round {last}", flush=True)
                time.sleep(3.0)  # into the next round
                d.stop("superlink", kill=True)
                d.stop("run")
                d.start_superlink()  # its database keeps the registered nodes
                run = d.submit({**settings, "resume": True})
                chaos.paused.clear()
            if run.poll() is not None:  # ended: the last rows may still be on their way to the file
                time.sleep(2.0)
                rows = show_rounds()
                if not rows or rows[-1]["round"] < args.rounds:
                    print(f"the run ended (exit {run.returncode}) before round {args.rounds}:\n" + d.log("run")[-3000:], flush=True)
                break
            time.sleep(2.0)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (main): stop now, leave nothing running, summarize what is there
        interrupted = True
        print("interrupted: stopping everything the soak started", flush=True)
    finally:
        chaos.stopping.set()
        # A restart under way waits until the SuperLink takes the node (restart_supernode), unless interrupted.
        chaos.join(timeout=5.0 if interrupted else 400)
        d.stop_all()
    return summarize(args, out, settings, chaos, server_killed, time.monotonic() - started)


def summarize(args: argparse.Namespace, out: Path, settings: dict, chaos: Chaos, server_killed: bool, wall: float) -> dict:
    from mops_core import checkpoint

    try:
        rows = json.loads((Path(settings["out-dir"]) / "results.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        rows = []
    numbers = [r["round"] for r in rows]
    trained = [r for r in rows if r["round"] > 0]
    try:
        saved = checkpoint.read(Path(settings["out-dir"]) / "checkpoint")
        loads = saved.config.get("round") == (numbers[-1] if numbers else None)
    except Exception as exc:  # noqa: BLE001 -- any failure to read it is the finding
        print(f"the checkpoint does not load: {exc}", flush=True)
        loads = False
    over = [r["round"] for r in trained if over_the_rule(r)]
    summary = {
        "rounds_completed": len(trained), "rounds_asked": args.rounds,
        "recorded_once": numbers == list(range(len(numbers))),
        "longest_round_seconds": max((r["seconds"] for r in trained), default=None),
        "median_round_seconds": statistics.median([r["seconds"] for r in trained]) if trained else None,
        "rounds_over_the_deadline_rule": over,
        "ended": {why: sum((r.get("replies") or {}).get("ended") == why for r in trained) for why in ("all in", "gone", "deadline", "timeout")},
        "dropped": {why: sum(len((r.get("replies") or {}).get(why, [])) for r in trained) for why in ("gone", "late", "stale")},
        "failed": sum(r.get("failed", 0) for r in trained),
        "nodes_killed": chaos.killed, "nodes_restarted": chaos.restarted, "server_killed_and_resumed": server_killed,
        "checkpoint_loads": loads, "wall_seconds": wall, "events": chaos.events,
        "settings": {k: settings[k] for k in ("round-deadline", "min-replies", "round-timeout", "fraction-train", "local-steps")},
        "straggle_seconds": args.straggle, "nodes": args.nodes, "seed": args.seed,
    }
    summary["ok"] = bool(summary["rounds_completed"] == args.rounds and summary["recorded_once"] and loads and not over
                         and summary["ended"]["timeout"] == 0 and (server_killed or not args.kill_server_at))
    (out / "churn.json").write_text(json.dumps(summary, indent=2))
    print(f"\nrounds completed {summary['rounds_completed']} of {args.rounds}; each recorded once: {summary['recorded_once']}")
    print(f"longest round {summary['longest_round_seconds']:.1f} s (median {summary['median_round_seconds']:.1f} s); "
          f"over the deadline rule + one heartbeat interval ({HEARTBEAT_DEFAULT_INTERVAL} s): {over or 'none'}"
          if trained else "no round completed")
    print(f"rounds ended: {summary['ended']}; replies dropped: {summary['dropped']}; failed {summary['failed']}")
    print(f"nodes killed {chaos.killed}, restarted {chaos.restarted}; server killed and resumed: {server_killed}")
    print(f"final checkpoint loads and names the last round: {loads}")
    print("OK" if summary["ok"] else "NOT OK", f"({wall:.0f} s; {out / 'churn.json'})")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--deadline", default="3x", help="round-deadline for the run (default 3x)")
    parser.add_argument("--min-replies", type=int, default=2)
    parser.add_argument("--round-timeout", type=float, default=900.0)
    parser.add_argument("--straggle", type=float, default=30.0, help="seconds the straggler sleeps in each train handler")
    parser.add_argument("--chaos-every", type=float, default=60.0, help="mean seconds between SuperNode kills")
    parser.add_argument("--kill-server-at", type=int, default=8, help="kill the SuperLink and ServerApp after this round (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=3600.0)
    parser.add_argument("--out", default="runs/churn")
    args = parser.parse_args(argv)
    if args.per_round > args.nodes or args.per_round < 2:
        parser.error("--per-round must be between 2 and --nodes")
    return args


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    return 0 if soak(parse_args(argv))["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
