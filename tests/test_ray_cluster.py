"""A simulation on an existing Ray cluster: two Ray nodes on this machine, the run's clients on both."""

import json

import pytest
from helpers import tiny_run_settings

from simulation.launch import launch

pytestmark = pytest.mark.slow


def test_the_simulation_runs_on_an_existing_two_node_ray_cluster_and_leaves_nothing_running(tmp_path, tiny_model_dir, toy_data_dir, monkeypatch):
    import ray
    from ray._private import state
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's own advice; silences a warning
    small = {"num_cpus": 1, "object_store_memory": 100 * 1024**2}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    try:
        cluster.add_node(**small)  # one CPU each: the two one-CPU ClientApp actors must land on different nodes
        settings = tiny_run_settings(tiny_model_dir, toy_data_dir, tmp_path / "cache", {
            "experts": 7, "num-server-rounds": 1, "local-steps": 2, "fraction-evaluate": 0.0, "min-available-nodes": 4,
            "out-dir": str(tmp_path / "run"),
        })
        code = launch(settings, supernodes=4, client_cpus=1, flwr_home=tmp_path / "flwr-home", timeout=600,
                      ray_address=cluster.address)
        assert code == 0
        rounds = json.loads((tmp_path / "run" / "results.json").read_text())["rounds"]
        assert rounds[1]["accepted"] == 4
        ray.init(address=cluster.address)
        try:
            actors = [a for a in state.actors().values() if a["ActorClassName"] == "ClientAppActor"]
            assert {a["Address"]["NodeID"] for a in actors} == {n["NodeID"] for n in ray.nodes()}  # clients on both nodes
            assert all(a["State"] == "DEAD" for a in actors)  # the run's actors ended with it
        finally:
            ray.shutdown()
    finally:
        nodes = cluster.list_all_nodes()
        cluster.shutdown()
    assert all(p.process.poll() is not None for n in nodes for ps in n.all_processes.values() for p in ps)
