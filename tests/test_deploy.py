"""A real deployment on 127.0.0.1: SuperLink with TLS, node authentication and a state database;
SuperNodes with their keys; the real app with a tiny model. Processes are always stopped."""

import json
import signal
import time

import pytest
import torch

from deploy.local import Deployment
from helpers import tiny_run_settings

pytestmark = pytest.mark.slow

NODES = ["node-0", "node-1", "node-2"]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dir, toy_data_dir):
    root = tmp_path_factory.mktemp("deploy")
    d = Deployment(root)
    d.prepare(NODES + ["rogue"])
    d.settings = tiny_run_settings(tiny_model_dir, toy_data_dir, root / "cache", {
        "experts": 7, "local-steps": 3, "num-server-rounds": 2, "min-available-nodes": 2,
    })
    d.start_superlink()
    try:
        for node in NODES[:2]:
            assert d.register(node).returncode == 0
            d.start_supernode(node, NODES.index(node), len(NODES))
        d.wait_online(2)
        yield d
    finally:
        d.stop_all()


def results(d, name):
    return json.loads((d.root / name / "results.json").read_text())


def with_node_2(deployment):
    """node-2 registered and online beside the first two, whichever tests ran before (it is idempotent)."""
    if "node-2" not in deployment.processes or deployment.processes["node-2"].poll() is not None:
        deployment.register("node-2")  # once registered, registering again is refused: harmless
        deployment.start_supernode("node-2", 2, len(NODES), max_retries=None)
    deployment.wait_online(3)


def a_finished_run(deployment, name):
    """A short run of this deployment's own, finished: what a test about runs asserts on."""
    done = deployment.run({**deployment.settings, "out-dir": str(deployment.root / name), "num-server-rounds": 1})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def wait_for_line(deployment, run, line, timeout=300.0):
    """Wait for `line` in the background `flwr run`'s log while that run lives; a failure shows the run's own log,
    which the next test's run would overwrite."""
    deadline = time.monotonic() + timeout
    while line not in deployment.log("run"):
        assert run.poll() is None, f"the run ended before {line!r}:\n" + deployment.log("run")[-3000:]
        assert time.monotonic() < deadline, f"timed out waiting for {line!r}:\n" + deployment.log("run")[-3000:]
        time.sleep(0.5)


def test_two_authenticated_supernodes_complete_two_rounds_over_tls(deployment):
    done = deployment.run({**deployment.settings, "out-dir": str(deployment.root / "run-a")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rounds = results(deployment, "run-a")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["accepted"] == 2 and r["failed"] == 0 for r in rounds[1:])


@pytest.mark.parametrize(
    "node, options, refusal",
    [
        ("rogue", {}, "[code: 2004] Failed to activate SuperNode"),  # a key the SuperLink never registered
        ("node-2", {"ca": False}, "CERTIFICATE_VERIFY_FAILED"),  # does not trust the SuperLink's CA
        ("node-2", {"insecure": True, "key": False}, "could not establish a connection"),  # plaintext, no key
    ],
)
def test_what_auth_and_tls_refuse(deployment, node, options, refusal):
    before = {n["node-id"] for n in deployment.nodes() if n["status"] == "online"}
    process = deployment.start_supernode(node, 2, len(NODES), **options)
    try:
        assert process.wait(timeout=120) != 0
    finally:
        deployment.stop(node)
    log = deployment.log(node)
    (deployment.logs / f"{node}.log").unlink()
    assert refusal in log, log[-2000:]
    assert {n["node-id"] for n in deployment.nodes() if n["status"] == "online"} == before


def test_a_supernode_that_restarts_mid_run_rejoins_and_is_sampled_again(deployment):
    with_node_2(deployment)
    out = deployment.root / "run-restart"
    # The reply the killed process owed never comes, and the node is back (connected again) before the
    # round ends: the round must see that it restarted, not wait the default hour of round-timeout.
    run = deployment.submit({**deployment.settings, "out-dir": str(out), "local-steps": 100, "num-server-rounds": 3})
    try:
        wait_for_line(deployment, run, "round 1: training on 3 nodes")
        time.sleep(2.0)
        deployment.stop("node-2", kill=True)
        deployment.restart_supernode("node-2", 2, len(NODES))  # the same key: the same node
        assert run.wait(timeout=900) == 0, deployment.log("run")[-3000:]
    finally:
        deployment.stop("run")
    rounds = results(deployment, "run-restart")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[1]["sampled"] == 3 and rounds[1]["accepted"] == 2  # its round-1 work died with it
    replies = rounds[1]["replies"]
    assert replies["ended"] == "gone" and len(replies["gone"]) == 1 and replies["received"] == 2, replies
    assert replies["seconds"] < 600, "the round waited for a reply that could not come"
    assert rounds[3]["sampled"] == 3 and rounds[3]["accepted"] == 3  # back, and trained again


def test_a_supernode_killed_mid_round_does_not_stop_the_run(deployment):
    with_node_2(deployment)
    out = deployment.root / "run-b"
    run = deployment.submit({**deployment.settings, "out-dir": str(out), "local-steps": 300})  # round-timeout: an hour
    try:
        wait_for_line(deployment, run, "round 1: training on 3 nodes")
        time.sleep(2.0)
        deployment.processes["node-2"].send_signal(signal.SIGKILL)
        assert run.wait(timeout=600) == 0, deployment.log("run")[-3000:]
    finally:
        deployment.stop("run")
        deployment.stop("node-2")
    rounds = results(deployment, "run-b")["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[1]["sampled"] == 3 and rounds[1]["accepted"] == 2  # the round went on without it
    replies = rounds[1]["replies"]
    assert len(replies["gone"]) == 1 and replies["received"] == 2 and replies["late"] == [], replies
    assert replies["seconds"] < 600, "the round waited for a node that was gone"  # a few heartbeats, not round-timeout
    assert rounds[2]["sampled"] == 2 and rounds[2]["accepted"] == 2


def test_a_restarted_superlink_keeps_its_nodes_and_runs(deployment):
    a_finished_run(deployment, "run-before-restart")  # its own: the test passes alone or after any others
    nodes_before = {n["node-id"] for n in deployment.nodes()}
    runs_before = {r["run-id"] for r in deployment.runs()}
    assert len(nodes_before) >= 2 and len(runs_before) >= 1
    deployment.stop("superlink")
    deployment.start_superlink()
    assert {n["node-id"] for n in deployment.nodes()} == nodes_before
    runs = {r["run-id"]: r for r in deployment.runs()}
    assert set(runs) == runs_before and all(r["status"].startswith("finished") for r in runs.values())


def test_a_node_trains_on_its_own_file_and_a_node_with_an_unreadable_file_is_left_out(tmp_path_factory, tiny_model_dir, toy_data_dir):
    from helpers import toy_records

    from mops_core.data import TASKS

    root = tmp_path_factory.mktemp("own-data")
    mine = toy_records((TASKS["dolly"][1], TASKS["dolly"][4], "poetry"), 8, seed=3)
    own = root / "own.jsonl"
    own.write_text("".join(json.dumps({"instruction": r.instruction, "context": r.context, "response": r.response,
                                       "task": r.task}) + "\n" for r in mine))
    broken = root / "broken.jsonl"
    broken.write_text(own.read_text().splitlines()[0] + "\n{not json\n")
    d = Deployment(root)
    d.prepare(["own", "broken"])
    try:
        d.start_superlink()
        for node, data in (("own", own), ("broken", broken)):
            assert d.register(node).returncode == 0
            d.start_supernode(node, 0, 0, node_config=f'data-file="{data}" partition-id=7' if node == "own" else f'data-file="{data}"')
        d.wait_online(2)
        # The shared dataset is the server's only: for its evaluation and gate pretraining.
        settings = tiny_run_settings(tiny_model_dir, toy_data_dir, root / "cache", {
            "local-steps": 3, "num-server-rounds": 1, "min-available-nodes": 1, "out-dir": str(root / "run"),
            "client-test-fraction": 0.0, "fraction-evaluate": 0.0,  # the node trains on every record of its file
        })
        done = d.run(settings)
    finally:
        d.stop_all()
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert "is left out: it could not load its data or base" in output and f"{broken}:2: not valid JSON" in output, output[-3000:]
    results = json.loads((root / "run" / "results.json").read_text())
    counts = results["info"]["clients"]
    assert list(counts) == ["7"] and counts["7"][1] == counts["7"][4] == 8 and sum(counts["7"]) == 16
    assert results["info"]["unknown_tasks"] == {"7": {"poetry": 8}}
    assert "poetry (8 records)" in output
    assert results["rounds"][1]["sampled"] == results["rounds"][1]["accepted"] == 1


def test_a_node_on_another_machine_gets_the_input_prompts_by_message_and_a_node_with_a_foreign_base_never_trains(
    tmp_path_factory, tiny_model_dir, toy_data_dir
):
    from mops_core.compression.pipeline import export_base, prepare_base
    from mops_core.config import Settings

    root = tmp_path_factory.mktemp("provisioning")
    settings = tiny_run_settings(tiny_model_dir, toy_data_dir, root / "server-cache", {
        "compression": "magnitude:0.5", "local-steps": 2, "num-server-rounds": 1, "min-available-nodes": 2,
        "fraction-evaluate": 0.0, "out-dir": str(root / "run"),
    })
    # What an operator provisions: the server's compressed base (mops compress --export), and by mistake another one.
    for name, compression in (("base", "magnitude:0.5"), ("foreign", "magnitude:0.25")):
        flat = {**settings, "compression": compression, "model-cache-dir": str(root / "export-cache")}
        model, tokenizer = prepare_base(Settings.from_flat(flat), progress=False)
        export_base(model, tokenizer, Settings.from_flat(flat), root / name)
    d = Deployment(root)
    d.prepare(["shared", "remote", "foreign"])
    try:
        d.start_superlink()
        for i, node in enumerate(("shared", "remote", "foreign")):
            assert d.register(node).returncode == 0
            own = "" if node == "shared" else f' model="{root / ("base" if node == "remote" else "foreign")}" model-cache-dir="{root / node}"'
            d.start_supernode(node, i, 3, node_config=f"partition-id={i} num-partitions=3{own}")
        d.wait_online(3)
        done = d.run(settings)
    finally:
        d.stop_all()
    output = done.stdout + done.stderr
    assert done.returncode == 0 and "perplexity" in output, output[-3000:]
    results = json.loads((root / "run" / "results.json").read_text())
    info = results["info"]
    assert sorted(info["clients"]) == ["0", "1"] and len(info["left_out"]) == 1  # partition 2: the foreign base
    [why] = info["left_out"].values()
    assert why.startswith("its base has fingerprint ") and f"the server's {info['base_fingerprint']}" in why
    assert "--export DIR" in output and why in output
    assert info["input_prompts_sent"] == 1  # to the remote node only: the shared one finds them in the server's cache
    assert len(list((root / "remote" / "input-prompts").glob("*/input_prompts.safetensors"))) == 1
    assert not (root / "foreign" / "input-prompts").exists()
    assert results["rounds"][1]["sampled"] == results["rounds"][1]["accepted"] == 2


def test_a_superlink_killed_mid_round_and_restarted_on_its_database_resumes_to_the_uninterrupted_adapter(
    tmp_path_factory, tiny_model_dir, toy_data_dir
):
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("superlink-crash")
    d = Deployment(root)
    d.prepare(["node-0", "node-1"])
    settings = tiny_run_settings(tiny_model_dir, toy_data_dir, root / "cache", {
        "experts": 7, "fraction-evaluate": 0.0, "local-steps": 20, "num-server-rounds": 3, "min-available-nodes": 2,
    })
    try:
        d.start_superlink()
        for i, node in enumerate(("node-0", "node-1")):
            assert d.register(node).returncode == 0
            d.start_supernode(node, i, 2, max_retries=None)  # a node keeps reconnecting while the SuperLink is down
        d.wait_online(2)
        done = d.run({**settings, "out-dir": str(root / "uninterrupted")})
        assert done.returncode == 0, done.stdout[-3000:]

        out = root / "interrupted"
        run = d.submit({**settings, "out-dir": str(out)})
        wait_for_line(d, run, "round 2: training on 2 nodes")
        time.sleep(1.0)
        d.stop("superlink", kill=True)  # the server's machine fails mid-round: the SuperLink and its ServerApp
        d.stop("run")
        assert json.loads((out / "checkpoint" / "adapter_config.json").read_text())["round"] == 1
        d.start_superlink()  # the same database: its registered nodes come back
        d.wait_online(2)
        resumed = d.run({**settings, "out-dir": str(out), "resume": True})
        assert resumed.returncode == 0, resumed.stdout[-3000:]
    finally:
        d.stop_all()
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3] and all(r["accepted"] == 2 for r in rounds[1:])
    a = load_file(str(root / "uninterrupted" / "checkpoint" / "adapter_model.safetensors"))
    b = load_file(str(out / "checkpoint" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "the resumed adapter differs"


def test_a_short_churn_soak_completes_every_round_through_kills_a_straggler_and_a_server_crash(tmp_path):
    """benchmarks/churn.py at a small size: nodes killed and restarted at random, one node that sleeps in
    every train handler, the SuperLink and its ServerApp killed after round 2 and the run resumed."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "churn.py"
    spec = importlib.util.spec_from_file_location("churn", path)
    churn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(churn)
    summary = churn.soak(churn.parse_args([
        "--rounds", "4", "--nodes", "4", "--per-round", "3", "--local-steps", "3", "--straggle", "25",
        "--chaos-every", "45", "--kill-server-at", "2", "--time-limit", "1500", "--out", str(tmp_path)]))
    assert summary["ok"], summary
    assert summary["recorded_once"] and summary["rounds_completed"] == 4 and summary["checkpoint_loads"]
    assert summary["server_killed_and_resumed"] and summary["nodes_killed"] >= 1, summary
    assert summary["ended"]["timeout"] == 0 and not summary["rounds_over_the_deadline_rule"]


def test_a_soak_stopped_with_sigterm_while_a_node_restarts_leaves_nothing_running(tmp_path, tiny_model_dir):
    """What a person or a CI job does to a soak that runs too long: it stops at once, every process it started with it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copytree(tiny_model_dir, tmp_path / "tiny-llama")  # the soak's own tiny world, made already
    log = tmp_path / "soak.log"
    with log.open("w") as out:
        soak = subprocess.Popen(
            [sys.executable, str(Path(__file__).parent.parent / "benchmarks" / "churn.py"), "--nodes", "2", "--per-round", "2",
             "--rounds", "50", "--chaos-every", "3", "--kill-server-at", "0", "--time-limit", "900", "--out", str(tmp_path)],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        waited = time.monotonic()
        while "chaos: killed" not in log.read_text():  # a restart is now under way (it waits on the SuperLink)
            assert soak.poll() is None and time.monotonic() - waited < 600, log.read_text()[-3000:]
            time.sleep(1.0)
        soak.send_signal(signal.SIGTERM)
        assert soak.wait(timeout=120) == 1  # a soak that did not finish is not ok
    finally:
        soak.kill()
    assert "interrupted: stopping everything the soak started" in log.read_text()
    time.sleep(2.0)
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(tmp_path) in cmdline.read_bytes().decode(errors="replace"):
                left.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass  # a process that ended meanwhile
    assert not left, left


def test_a_nodes_own_gate_persists_across_a_supernodes_rounds(tmp_path_factory, tiny_model_dir, toy_data_dir):
    """gate-aggregation=local on real SuperNodes: the gate a node trained in round 1 is the one it holds in round 2
    (kept in the SuperNode's node state between its ClientApp processes), and never the server's."""
    from safetensors.torch import load_file

    from server import protocol

    root = tmp_path_factory.mktemp("local-gates")
    d = Deployment(root)
    d.prepare(["node-0", "node-1"])
    settings = tiny_run_settings(tiny_model_dir, toy_data_dir, root / "cache", {
        "experts": 7, "fraction-evaluate": 0.0, "local-steps": 5, "num-server-rounds": 2, "min-available-nodes": 2,
        "gate-aggregation": "local", "out-dir": str(root / "run"),
    })
    try:
        d.start_superlink()
        for i, node in enumerate(("node-0", "node-1")):
            assert d.register(node).returncode == 0
            own = f' {protocol.ADAPTER_DIR}="{root / node}"'
            d.start_supernode(node, i, 2, node_config=protocol.node_config_text(i, 2) + own)
        d.wait_online(2)
        done = d.run(settings)
    finally:
        d.stop_all()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rounds = json.loads((root / "run" / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and all(r["accepted"] == 2 for r in rounds[1:])
    server = load_file(str(root / "run" / "checkpoint" / "adapter_model.safetensors"))
    gates = [k for k in server if k.startswith("gate.") and "fc" in k]
    assert gates
    # Each node's adapter was saved as its round-2 message arrived: the round-2 global experts with the gate
    # it trained in round 1, which the server never saw; the server's gate stayed the pretrained one.
    for node in ("node-0", "node-1"):
        mine = load_file(str(root / node / "adapter_model.safetensors"))
        assert any(not torch.equal(mine[k], server[k]) for k in gates), node
    a, b = (load_file(str(root / n / "adapter_model.safetensors")) for n in ("node-0", "node-1"))
    assert any(not torch.equal(a[k], b[k]) for k in gates), "the two nodes hold different gates"
