"""The real Flower app on Ray, through `flwr run`, with a tiny model: the README's main job, short.

Each run starts Ray and a local SuperLink (tens of seconds), so the runs are shared by the tests
of this module.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import tensorboard_events
from safetensors.torch import load_file, save_file

from simulation.launch import PROJECT, launch, run_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tiny_model_dir, toy_data_dir):
    """Settings and an isolated Flower home for this module's runs (each run gets its own SuperLink ports)."""
    root = tmp_path_factory.mktemp("fed")
    settings = {
        "model": str(tiny_model_dir), "data-dir": str(toy_data_dir), "model-cache-dir": str(root / "cache"),
        "experts": 7, "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16,
        "samples": 140, "max-length": 64, "lr": 3e-2, "input-prompt-steps": 5, "gate-pretrain-steps": 50,
        "eval-samples": 0, "num-server-rounds": 3, "local-steps": 15, "fraction-train": 1.0,
        "min-available-nodes": 3, "min-partition-size": 5,
    }
    return {"root": root, "settings": settings, "home": root / "flwr-home"}


def run(fed, out: Path, **changes) -> dict:
    code = launch(
        {**fed["settings"], "out-dir": str(out), **changes},
        supernodes=3, client_cpus=1, flwr_home=fed["home"], timeout=600,
    )
    assert code == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def mops_run(fed):
    """The README's main command (`make demo` = scripts/demo.sh), in short form."""
    out = fed["root"] / "mops"
    command = [
        "bash", str(PROJECT / "scripts" / "demo.sh"), "--supernodes", "3", "--client-cpus", "1",
        "--flwr-home", str(fed["home"]), "--out-dir", str(out), "--run-config", run_config(fed["settings"]),
    ]
    done = subprocess.run(command, env={**os.environ, "SKIP_INSTALL": "1"}, timeout=600)
    assert done.returncode == 0
    return out, json.loads((out / "results.json").read_text())


def test_main_job_trains_mops_across_clients_and_perplexity_falls(mops_run):
    out, results = mops_run
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[-1]["perplexity"] < rounds[0]["perplexity"], [r["perplexity"] for r in rounds]
    for r in rounds[1:]:
        assert r["sampled"] == r["accepted"] == 3 and not r["dropped"] and r["failed"] == 0
        assert r["bytes_down"] > 0 and r["bytes_up"] == r["bytes_down"]
        assert len(r["client_gate_share"]) == 7
        # what the gate did with each task's test samples
        assert set(r["task_routing"]) == set(r["per_task"]) == set(r["task_gate_entropy"])
        # federated evaluation every round: 0.1 of 3 nodes is one, on its own held-out share
        client = r["client_eval"]
        assert client["clients"] == 1 and client["tokens"] > 0 and client["p10"] <= client["p50"] <= client["p90"]
        assert 1.0 < client["perplexity"] < 1e4 and set(client["per_task"]) <= set(r["per_task"])
    # ROUGE-L and exact match of greedy answers, after the last round only (the default)
    assert [r["round"] for r in rounds if r["generation"]] == [3]
    generation = rounds[-1]["generation"]
    assert generation["samples"] == 14 and 0 <= generation["rouge_l"] <= 100 and len(generation["examples"]) == 7  # 2 test samples a task
    info = results["info"]
    assert sorted(info["clients"]) == ["0", "1", "2"]
    held = info["clients_heldout"]
    assert sum(sum(c) for c in info["clients"].values()) + sum(held.values()) == 126  # 90% of 140, all handed out
    assert all(h >= 1 for h in held.values())  # every client holds some back for federated evaluation
    assert info["message_parameters"] == info["trainable_parameters"]  # an RMS gate has no statistics to send
    raw = info["message_parameters"] * 4 * 3  # float32 experts + gate to 3 clients
    assert raw <= rounds[1]["bytes_down"] < raw + 3 * 2048  # plus the records' own headers
    for name in ("perplexity.png", "client_tasks.png", "gate_heatmap.png"):
        assert (out / name).stat().st_size > 0
    config = json.loads((out / "checkpoint" / "adapter_config.json").read_text())
    assert config["round"] == 3 and config["gating"] == "attention"
    # The same rounds, live, as TensorBoard's own reader finds them under out/tensorboard
    events = tensorboard_events(out / "tensorboard")
    assert events["scalars"]["test/perplexity"] == [(r["round"], pytest.approx(r["perplexity"], rel=1e-6)) for r in rounds]
    assert events["scalars"]["clients/perplexity"] == [(r["round"], pytest.approx(r["client_eval"]["perplexity"], rel=1e-6)) for r in rounds[1:]]
    assert events["scalars"]["train/loss"] == [(r["round"], pytest.approx(r["train_loss"], rel=1e-6)) for r in rounds[1:]]
    assert [step for step, _ in events["scalars"]["replies/received"]] == [1, 2, 3]
    assert events["scalars"]["text/rouge_l"] == [(3, pytest.approx(generation["rouge_l"], rel=1e-6))]
    assert "gate/heatmap" in events["images"] and "settings/text_summary" in events["tensors"]


def test_fedprompt_runs_the_same_way_without_a_gate(fed):
    out = fed["root"] / "fedprompt"
    # Averaging experts by gate means nothing without a gate: FedPrompt averages by examples and accepts every reply.
    results = run(fed, out, method="fedprompt", **{"expert-aggregation": "gate"})
    rounds = results["rounds"]
    assert rounds[-1]["perplexity"] < rounds[0]["perplexity"]
    assert all(r["accepted"] == 3 and not r["dropped"] for r in rounds[1:])
    assert rounds[-1]["client_gate_share"] is None and rounds[-1]["gate_entropy"] is None
    assert set(rounds[-1]["task_routing"].values()) == {None}
    tensors = load_file(str(out / "checkpoint" / "adapter_model.safetensors"))
    assert set(tensors) == {"input_prompts", "prompts"}


def test_resume_after_a_round_reaches_the_uninterrupted_state(fed, mops_run):
    uninterrupted, _ = mops_run
    out = fed["root"] / "resumed"
    first = run(fed, out, **{"num-server-rounds": 1})
    assert [r["round"] for r in first["rounds"]] == [0, 1]
    # As if killed after results.json but before the checkpoint of round 2 were written:
    ahead = {**first, "rounds": first["rounds"] + [{**first["rounds"][-1], "round": 2, "perplexity": -1.0}]}
    (out / "results.json").write_text(json.dumps(ahead))
    # The start state cached now differs from the one the run began with, as after an upgrade that
    # computes it anew: the run goes on from its own checkpoint regardless.
    cached = sorted((fed["root"] / "cache" / "start-states").glob("*/adapter_model.safetensors"))
    assert cached
    originals = {path: path.read_bytes() for path in cached}
    for path in cached:
        save_file({k: v + 0.5 if k == "input_prompts" else v for k, v in load_file(str(path)).items()}, str(path))
    # ... and as if it had shown that round 2 in TensorBoard too: the resumed run hides it and goes on from round 2.
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(out / "tensorboard")) as writer:
        writer.add_scalar("test/perplexity", -1.0, 2)
    try:
        resumed = run(fed, out, **{"num-server-rounds": 3, "resume": True})
    finally:
        for path, data in originals.items():
            path.write_bytes(data)
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert resumed["rounds"][2]["perplexity"] > 0, "round 2 must be retrained from the round-1 checkpoint"
    walls = [r["wall_seconds"] for r in resumed["rounds"]]
    assert walls == sorted(walls) and walls[1] == first["rounds"][1]["wall_seconds"]  # the clock goes on from round 1
    a = load_file(str(uninterrupted / "checkpoint" / "adapter_model.safetensors"))
    b = load_file(str(out / "checkpoint" / "adapter_model.safetensors"))
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resuming"
    curve = tensorboard_events(out / "tensorboard")["scalars"]["test/perplexity"]
    assert curve == [(r["round"], pytest.approx(r["perplexity"], rel=1e-6)) for r in resumed["rounds"]]  # each round once


def test_your_own_three_task_jsonl_trains_federated_with_one_expert_per_task(fed):
    from helpers import toy_records

    records = toy_records(("translate", "classify", "summarise"), 40)
    data = fed["root"] / "mine.jsonl"
    data.write_text("".join(json.dumps({"instruction": r.instruction, "context": r.context, "response": r.response,
                                        "task": r.task}) + "\n" for r in records))
    out = fed["root"] / "own-data"
    results = run(fed, out, dataset=str(data), experts=0, samples=120, **{"num-server-rounds": 2})
    rounds, info = results["rounds"], results["info"]
    assert info["tasks"] == ["classify", "summarise", "translate"]
    trained = sum(sum(c) for c in info["clients"].values())
    assert trained + sum(info["clients_heldout"].values()) == 108 and all(len(c) == 3 for c in info["clients"].values())
    assert all(r["accepted"] == 3 and len(r["client_gate_share"]) == 3 for r in rounds[1:])
    assert set(rounds[-1]["per_task"]) == {"classify", "summarise", "translate"}
    assert json.loads((out / "checkpoint" / "adapter_config.json").read_text())["num_experts"] == 3


def test_client_side_dp_and_a_norm_bound_run_end_to_end(fed):
    """Clients clip their own updates (Flower's mod, asked for by the server's wrapper); the server measures
    what arrives, bounds it relative to the median, and logs the privacy parameters in results.json."""
    out = fed["root"] / "dp"
    results = run(fed, out, **{"num-server-rounds": 1, "dp-clipping": "client", "dp-clip": 0.01, "dp-noise": 0.0,
                               "update-norm-bound": "3x"})
    assert results["info"]["privacy"] == {"clipping": "client", "clip": 0.01, "noise_multiplier": 0.0,
                                          "clients_per_round": 3, "noise_std": 0.0}
    row = results["rounds"][1]
    assert row["accepted"] == 3 and 0 < row["update_norm_median"] <= 0.01 * (1 + 1e-5)  # clipped on the clients
