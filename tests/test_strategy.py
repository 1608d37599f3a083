"""MoPsFedAvg on hand-made replies: the average, the checks, the sampling. No Ray, no network."""

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from server.strategy import MoPsFedAvg

SHAPES = {"prompts": (3, 2, 4), "gate.fc1.weight": (5, 4), "gate.fc1.bias": (5,), "gate.fc2.weight": (3, 5), "gate.fc2.bias": (3,)}


def arrays(seed, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def metadata(node, message_type=MessageType.TRAIN):
    """What a reply from `node` carries besides its content."""
    return Metadata(
        run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="x",
        group_id="", created_at=0.0, ttl=60.0, message_type=message_type,
    )


def reply(node, tensors=None, metrics=None, error=None):
    meta = metadata(node)
    if error:
        return Message(error=Error(code=0, reason=error), metadata=meta)
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}), "metrics": MetricRecord(metrics)})
    return Message(content, metadata=meta)


def metrics(n, loss=1.0):
    return {"num-examples": n, "train-loss": loss, "gate": [0.2, 0.3, 0.5]}


def strategy(**kw):
    return MoPsFedAvg(SHAPES, seed=0, **kw)


def test_aggregate_is_the_example_weighted_mean_of_the_prompt_and_gate_arrays():
    updates = {1: arrays(1), 2: arrays(2), 3: arrays(3)}
    weights = {1: 10, 2: 30, 3: 60}
    agg, agg_metrics = strategy().aggregate_train(1, [reply(n, updates[n], metrics(weights[n], loss=n)) for n in updates])
    assert set(agg.keys()) == set(SHAPES)
    total = sum(weights.values())
    for key in SHAPES:
        expected = sum(updates[n][key].astype(np.float64) * weights[n] / total for n in updates)
        np.testing.assert_allclose(agg[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert agg_metrics["train-loss"] == pytest.approx((1 * 10 + 2 * 30 + 3 * 60) / 100)


def test_gate_weighting_averages_each_expert_by_examples_times_its_gate_score_and_the_gate_by_examples():
    updates = {1: arrays(1), 2: arrays(2), 3: arrays(3)}
    weights = {1: 10, 2: 30, 3: 60}
    gates = {1: [0.8, 0.1, 0.1], 2: [0.1, 0.1, 0.8], 3: [0.3, 0.3, 0.4]}
    replies = [reply(n, updates[n], {**metrics(weights[n]), "gate": gates[n]}) for n in updates]
    agg, _ = strategy(expert_weighting="gate").aggregate_train(1, replies)
    for e in range(3):  # expert by expert, written out
        w = {n: weights[n] * gates[n][e] for n in updates}
        expected = sum(updates[n]["prompts"][e].astype(np.float64) * w[n] for n in updates) / sum(w.values())
        np.testing.assert_allclose(agg["prompts"].numpy()[e], expected, rtol=1e-6, atol=1e-7)
    plain, _ = strategy().aggregate_train(1, replies)
    for key in SHAPES:
        if key != "prompts":
            np.testing.assert_array_equal(agg[key].numpy(), plain[key].numpy())
    assert not np.allclose(agg["prompts"].numpy(), plain["prompts"].numpy())


def test_gate_weighting_with_the_same_gate_everywhere_is_plain_fedavg():
    replies = [reply(n, arrays(n), metrics(10 * n)) for n in (1, 2, 3)]
    gated, _ = strategy(expert_weighting="gate").aggregate_train(1, replies)
    plain, _ = strategy().aggregate_train(1, replies)
    np.testing.assert_allclose(gated["prompts"].numpy(), plain["prompts"].numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("gate, problem", [([0.5, 0.5], "one mean score per expert (3)"), ([0.0, 0.0, 0.0], "positive sum"), ([1.2, -0.1, -0.1], "non-negative")])
def test_gate_weighting_drops_a_reply_whose_gate_scores_cannot_weigh_the_experts(gate, problem):
    s = strategy(expert_weighting="gate")
    good = [reply(1, arrays(1), metrics(10)), reply(2, arrays(2), metrics(20))]
    s.aggregate_train(1, [*good, reply(77, arrays(9), {**metrics(5), "gate": gate})])
    assert s.rounds[1].accepted == 2 and problem in s.rounds[1].dropped[0]
    with pytest.raises(ValueError, match="expert_weighting must be"):
        strategy(expert_weighting="tasks")


BAD = {
    "wrong keys": (lambda: {**arrays(9), "base.model.embed_tokens.weight": np.zeros((2, 2), np.float32)}, metrics(5), "unexpected base.model.embed_tokens.weight"),
    "missing key": (lambda: {k: v for k, v in arrays(9).items() if k != "gate.fc2.bias"}, metrics(5), "missing gate.fc2.bias"),
    "wrong shape": (lambda: {**arrays(9), "prompts": np.zeros((3, 3, 4), np.float32)}, metrics(5), "'prompts' has shape (3, 3, 4), the model expects (3, 2, 4)"),
    "nan": (lambda: {**arrays(9), "gate.fc1.bias": np.full((5,), np.nan, np.float32)}, metrics(5), "'gate.fc1.bias' holds NaN or inf"),
    "inf": (lambda: {**arrays(9), "prompts": np.full((3, 2, 4), np.inf, np.float32)}, metrics(5), "'prompts' holds NaN or inf"),
    "no example count": (lambda: arrays(9), {"train-loss": 1.0, "gate": [0.2, 0.3, 0.5]}, "no 'num-examples'"),
    "zero examples": (lambda: arrays(9), metrics(0), "'num-examples' must be a positive number"),
    "nan metric": (lambda: arrays(9), {**metrics(5), "train-loss": float("nan")}, "metric 'train-loss' is not finite"),
    "other metrics": (lambda: arrays(9), {"num-examples": 5, "train-loss": 1.0}, "differ from the other replies"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_a_bad_reply_is_dropped_with_its_node_and_problem_and_changes_nothing(kind, caplog):
    make, bad_metrics, problem = BAD[kind]
    good = [reply(1, arrays(1), metrics(10)), reply(2, arrays(2), metrics(20))]
    clean, _ = strategy().aggregate_train(1, good)
    s = strategy()
    mixed, _ = s.aggregate_train(1, [*good, reply(77, make(), bad_metrics)])
    for key in SHAPES:
        np.testing.assert_array_equal(mixed[key].numpy(), clean[key].numpy())
    log = s.rounds[1]
    assert log.accepted == 2 and len(log.dropped) == 1
    assert log.dropped[0].startswith("node 77:") and problem in log.dropped[0]
    assert f"dropping the reply of node 77 (partition ?): {log.dropped[0].removeprefix('node 77: ')}" in caplog.text


def test_failed_clients_do_not_stop_the_round_and_all_bad_keeps_the_state():
    s = strategy()
    agg, _ = s.aggregate_train(1, [reply(1, arrays(1), metrics(10)), reply(5, error="out of memory")])
    np.testing.assert_array_equal(agg["prompts"].numpy(), arrays(1)["prompts"])
    assert s.rounds[1].failed == 1 and s.rounds[1].accepted == 1
    nothing, no_metrics = s.aggregate_train(2, [reply(5, error="boom"), reply(6, {**arrays(1), "prompts": np.zeros(1, np.float32)}, metrics(3))])
    assert nothing is None and no_metrics is None  # Strategy.start keeps the previous global arrays


class FakeGrid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_sampling_follows_partitions_not_node_ids_so_a_resumed_run_replays_it():
    parts = list(range(20))
    run_a = dict(zip(range(1000, 1020), parts))  # node ids differ between runs...
    run_b = dict(zip(range(5000, 5020)[::-1], parts))
    picks = []
    for mapping in (run_a, run_b):
        s = strategy(partitions=mapping, fraction_train=0.25, min_available_nodes=20)
        picks.append([sorted(mapping[n] for n in s.sample(FakeGrid(mapping), r)) for r in (1, 2, 3)])
    assert picks[0] == picks[1]  # ...the partitions trained each round do not
    assert all(len(p) == 5 for p in picks[0]) and picks[0][0] != picks[0][1]
    resumed = strategy(partitions=run_b, fraction_train=0.25, min_available_nodes=20, round_offset=2)
    assert sorted(run_b[n] for n in resumed.sample(FakeGrid(run_b), 1)) == picks[0][2]


@pytest.fixture
def server_identity(monkeypatch):
    """What the ServerApp runtime sets in a real run, so that the server can build messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)


def test_configure_train_sends_only_the_trainable_arrays_and_the_run_round(server_identity):
    mapping = {11: 0, 12: 1, 13: 2, 14: 3}
    s = strategy(partitions=mapping, fraction_train=0.5, min_available_nodes=4, round_offset=3)
    payload = ArrayRecord({k: Array(v) for k, v in arrays(0).items()})
    messages = list(s.configure_train(1, payload, ConfigRecord({"start-state": "abc"}), FakeGrid(mapping)))
    assert len(messages) == 2 and all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    content = messages[0].content
    assert set(content["arrays"].keys()) == set(SHAPES)
    assert content["config"]["server-round"] == 4 and content["config"]["start-state"] == "abc"
    assert s.rounds[4].bytes_down == 2 * payload.count_bytes()


class AnsweringGrid(FakeGrid):
    """Answers each message with `answer(node)`, as the nodes' query handlers would."""

    def __init__(self, nodes, answer):
        super().__init__(nodes)
        self.answer = answer

    def send_and_receive(self, messages, timeout=None):
        return [self.answer(m.metadata.dst_node_id) for m in messages]


def partition_report(node, unknown=None):
    counts = {"partition-id": node, "num-partitions": 3, "num-examples": 4, "task-counts": [4, 0]}
    content = RecordDict({"metrics": MetricRecord(counts)})
    if unknown is not None:
        content["unknown-tasks"] = ConfigRecord({"names": list(unknown), "counts": list(unknown.values())})
    return Message(content, metadata=metadata(node, MessageType.QUERY))


def test_discovery_leaves_out_a_node_that_cannot_read_its_data_and_it_is_never_sampled(server_identity, caplog):
    from server.app import discover

    bad_file = "DataError: 1 unreadable line(s) in /data/mine.jsonl:\n/data/mine.jsonl:3: not valid JSON (Expecting value, column 1)"
    grid = AnsweringGrid([1, 2, 3], lambda n: reply(n, error=bad_file) if n == 2 else partition_report(n))
    with caplog.at_level(logging.WARNING):
        found, left_out = discover(grid, ("a", "b"), 3, timeout=1.0)
    assert sorted(found) == [1, 3] and found[3]["partition-id"] == 3 and found[1]["task-counts"] == [4, 0]
    assert left_out == {2}
    assert "node 2 is left out" in caplog.text and "/data/mine.jsonl:3: not valid JSON" in caplog.text
    s = strategy(partitions={1: 1, 3: 3}, left_out=left_out, fraction_train=1.0, min_available_nodes=3)
    assert all(sorted(s.sample(grid, r)) == [1, 3] for r in (1, 2, 3))


def test_discovery_names_the_tasks_the_run_does_not_know_once(server_identity, caplog):
    from server.app import discover

    grid = AnsweringGrid([1, 2, 3], lambda n: partition_report(n, {"rewrite": 5, "poetry": 1} if n != 2 else {}))
    with caplog.at_level(logging.WARNING):
        found, left_out = discover(grid, ("a", "b"), 3, timeout=1.0)
    assert not left_out and found[1]["unknown-tasks"] == {"rewrite": 5, "poetry": 1} and found[2]["unknown-tasks"] == {}
    named = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert named == ["nodes hold tasks the run does not know; they train on them and the gate routes them: "
                     "poetry (2 records), rewrite (10 records)"]


def test_discovery_stops_the_run_with_the_nodes_reason_when_no_node_can_report_its_partition(server_identity):
    from server.app import discover

    # Flower wraps a ClientApp's exception: the cause is the reason's last line.
    reason = "\nException ClientAppException occurred. Message: no Dirichlet(alpha=0.5) split of 15 samples"
    grid = AnsweringGrid([1, 2, 3], lambda n: reply(n, error=reason))
    with pytest.raises(RuntimeError, match=r"none of the 3 nodes .*: Exception ClientAppException occurred. Message: no Dirichlet") as err:
        discover(grid, ("a", "b"), 3, timeout=1.0)
    assert str(err.value).count("no Dirichlet") == 1  # the same reason once, not once per node


def test_waiting_for_nodes_explains_a_federation_too_small_and_gives_up_at_the_timeout(monkeypatch, caplog):
    import server.strategy as strategy_module
    from server.strategy import wait_for_nodes

    monkeypatch.setattr(strategy_module, "STALL_HINT_SECONDS", 0.0)
    joining = iter([[1], [1, 2], [1, 2, 3]])
    grid = type("Grid", (), {"get_node_ids": lambda self: next(joining)})()
    assert wait_for_nodes(grid, 3, timeout=5, poll=0.0) == [1, 2, 3]  # nodes that keep joining are waited for
    with pytest.raises(RuntimeError, match=r"only 2 of the 100 nodes .*num-supernodes=100"):
        wait_for_nodes(FakeGrid({1: 0, 2: 1}), 100, timeout=0.05, poll=0.01)
    assert "run it with num-supernodes=100, or set min-available-nodes=2" in caplog.text


def eval_reply(node, tokens, nll, task_tokens=None, task_nll=None, **changes):
    metrics = {"num-examples": 2, "eval-tokens": tokens, "eval-nll": nll,
               "task-tokens": task_tokens or [tokens, 0], "task-nll": task_nll or [nll, 0.0], **changes}
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), metadata=metadata(node, MessageType.EVALUATE))


def test_federated_evaluation_weighs_clients_by_tokens_and_reports_their_spread():
    from server.strategy import aggregate_client_eval

    tokens = np.array([10, 40, 25, 5, 20])
    loss = np.array([2.0, 1.5, 3.0, 0.5, 2.5])  # mean NLL per token of each client
    replies = [dict(eval_reply(n, int(t), float(l * t), [int(t), 0], [float(l * t), 0.0]).content["metrics"])
               for n, (t, l) in enumerate(zip(tokens, loss))]
    result = aggregate_client_eval(replies, ["a", "b"])
    assert result["loss"] == pytest.approx(np.average(loss, weights=tokens))
    assert result["perplexity"] == pytest.approx(np.exp(np.average(loss, weights=tokens)))
    assert [result["p10"], result["p50"], result["p90"]] == pytest.approx(np.percentile(np.exp(loss), [10, 50, 90]))
    assert result["tokens"] == 100 and result["clients"] == 5 and result["per_task"] == pytest.approx({"a": result["perplexity"]})


def test_a_bad_evaluation_reply_is_dropped_with_the_node_named(caplog):
    s = strategy(fraction_evaluate=0.5, tasks=["a", "b"])
    good = [eval_reply(1, 10, 20.0), eval_reply(2, 30, 30.0)]
    bad = [
        eval_reply(3, 10, float("nan")),  # NaN loss
        eval_reply(4, 10, 5.0, **{"eval-tokens": None}),  # no token count
        eval_reply(5, -3, 5.0),  # a negative count
        eval_reply(6, 10, 5.0, task_tokens=[10]),  # not one count per task
        reply(7, error="out of memory"),
    ]
    with caplog.at_level(logging.WARNING):
        metrics = s.aggregate_evaluate(1, good + bad)
    assert metrics["perplexity"] == pytest.approx(np.exp(50.0 / 40)) and metrics["clients"] == 2
    assert s.rounds[1].client_eval["tokens"] == 40
    for node in (3, 4, 5, 6, 7):
        assert f"node {node} " in caplog.text
    assert "metric 'eval-nll' must be finite" in caplog.text and "no eval-tokens" in caplog.text


def test_evaluation_samples_its_own_share_of_the_nodes_and_flower_no_longer_skips_it(caplog, server_identity):
    from mops_core.config import Settings

    with caplog.at_level(logging.WARNING):
        s = strategy(partitions=dict(zip(range(100, 120), range(20))), fraction_evaluate=Settings().federated.fraction_evaluate,
                     min_available_nodes=20, left_out={100})
    assert "evaluation will be skipped" not in caplog.text
    grid = FakeGrid(range(100, 120))
    picked = s.sample(grid, 1, evaluate=True)
    assert len(picked) == 1 and 100 not in picked and picked == s.sample(grid, 1, evaluate=True)
    messages = list(s.configure_evaluate(1, ArrayRecord({k: Array(v) for k, v in arrays(0).items()}), ConfigRecord({"tasks": ["a"]}), grid))
    assert [m.metadata.dst_node_id for m in messages] == picked and messages[0].metadata.message_type == MessageType.EVALUATE
    assert list(strategy(fraction_evaluate=0.0).configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)) == []


def test_metrics_every_chooses_the_rounds_that_score_greedy_answers():
    from mops_core.config import FederatedConfig
    from server.app import scores_text

    rounds = lambda **kw: [n for n in range(0, 7) if scores_text(n, FederatedConfig(num_server_rounds=6, **kw))]  # noqa: E731
    assert rounds() == [6]  # the default: the last round only
    assert rounds(metrics_every=2) == [0, 2, 4, 6]  # the start too, as the baseline of the curve
    assert rounds(metrics_every=4) == [0, 4, 6]
