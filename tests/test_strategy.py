"""MoPsFedAvg on hand-made replies: the average, the checks, the sampling. No Ray, no network."""

import logging

import numpy as np
import torch
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict

from mops_core.config import Settings
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


def admitted(partitions=None, left_out=(), tasks=("a", "b"), admission=None):
    """An Admission as discovery leaves it: `partitions` (node -> partition id) admitted, `left_out` refused."""
    from mops_core.start_state import tensor_sha
    from server.admission import Admission
    from server.protocol import NodeReport

    admission = admission or Admission(Settings(), tuple(tasks), SERVER_BASE, PROMPTS, tensor_sha(PROMPTS), 1.0)
    for node, part in (partitions or {}).items():
        admission.reports[node] = NodeReport(part, len(partitions), 4, 1, (4, 0), True, SERVER_BASE)
        admission.partitions[node] = part
    admission.left_out.update(left_out)
    return admission


def strategy(partitions=None, left_out=(), admission=None, tasks=("a", "b"), round_offset=0, expert_weighting="examples",
             norm_bound=None, expected=None, **fed):
    """The strategy as the ServerApp builds it, with a test's own settings (`fed`: FederatedConfig fields)."""
    from mops_core.config import FederatedConfig

    fed = {"fraction_train": 0.1, "fraction_evaluate": 0.0, "min_available_nodes": 2, **fed}
    bound = "" if norm_bound is None else f"{norm_bound[0]:g}" + ("x" if norm_bound[1] else "")
    config = FederatedConfig(expert_aggregation=expert_weighting, update_norm_bound=bound, **fed)
    return MoPsFedAvg(expected or SHAPES, admission or admitted(partitions, left_out, tasks), config, seed=0, gated=True,
                      round_offset=round_offset)


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
    with pytest.raises(ValueError, match="setting 'expert-aggregation': must be one of 'examples', 'gate', got 'tasks'"):
        Settings.from_flat({"expert-aggregation": "tasks"})  # what the strategy is built from


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
    """Answers each message with `answer(message)`, as the nodes' handlers would; keeps what it was sent."""

    def __init__(self, nodes, answer):
        super().__init__(nodes)
        self.answer = answer
        self.sent = []

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        for m in messages:  # as Flower's grids do when they push a message
            m.metadata.__dict__["_message_id"] = m.object_id
        self.sent += messages
        return [self.answer(m) for m in messages]


def unavailable(message):
    """The error the SuperLink itself replies for a node that stopped sending heartbeats: from the SuperLink's id."""
    meta = Metadata(run_id=1, message_id="", src_node_id=1, dst_node_id=1, reply_to_message_id=message.metadata.message_id,
                    group_id="", created_at=0.0, ttl=60.0, message_type=message.metadata.message_type)
    return Message(error=Error(code=5, reason="Error: Node Unavailable"), metadata=meta)


SERVER_BASE = "f" * 32
PROMPTS = torch.arange(12, dtype=torch.float32).reshape(3, 4)


def partition_report(node, unknown=None, fingerprint=SERVER_BASE, has_prompts=True):
    counts = {"partition-id": node, "num-partitions": 3, "num-examples": 4, "num-heldout": 1, "task-counts": [4, 0],
              "has-input-prompts": int(has_prompts)}
    content = RecordDict({"metrics": MetricRecord(counts), "node": ConfigRecord({"base-fingerprint": fingerprint})})
    if unknown is not None:
        content["unknown-tasks"] = ConfigRecord({"names": list(unknown), "counts": list(unknown.values())})
    return Message(content, metadata=metadata(node, MessageType.QUERY))


def nodes_answer(query, stored=lambda node: reply_ok(node)):
    """A node's two handlers: `query(node)` for the report, `stored(node)` for the input prompts."""
    return lambda m: query(m.metadata.dst_node_id) if m.metadata.message_type == MessageType.QUERY else stored(m.metadata.dst_node_id)


def reply_ok(node):
    return Message(RecordDict({"metrics": MetricRecord({"stored": 1})}), metadata=metadata(node, "query.start_state"))


def admission(timeout=1.0):
    from mops_core.start_state import tensor_sha
    from server.admission import Admission

    return Admission(Settings(), ("a", "b"), SERVER_BASE, PROMPTS, tensor_sha(PROMPTS), timeout)


def test_discovery_leaves_out_a_node_that_cannot_read_its_data_and_it_is_never_sampled(server_identity, caplog):
    from server.app import discover

    bad_file = "DataError: 1 unreadable line(s) in /data/mine.jsonl:\n/data/mine.jsonl:3: not valid JSON (Expecting value, column 1)"
    grid = AnsweringGrid([1, 2, 3], nodes_answer(lambda n: reply(n, error=bad_file) if n == 2 else partition_report(n)))
    a = admission()
    with caplog.at_level(logging.WARNING):
        discover(grid, a, 2, timeout=1.0)
    assert sorted(a.reports) == [1, 3] and a.reports[3].partition_id == 3 and a.reports[1].task_counts == (4, 0)
    assert a.left_out == {2} and a.partitions == {1: 1, 3: 3}
    assert "node 2 is left out" in caplog.text and "/data/mine.jsonl:3: not valid JSON" in caplog.text
    s = strategy(admission=a, fraction_train=1.0, min_available_nodes=3)
    assert all(sorted(s.sample(grid, r)) == [1, 3] for r in (1, 2, 3))
    assert a.info()["clients"] == {"1": [4, 0], "3": [4, 0]} and list(a.info()["left_out"]) == ["2"]


def test_a_node_with_a_foreign_base_is_left_out_with_both_fingerprints_and_the_fix_and_never_trains(server_identity, caplog):
    from server.app import discover

    grid = AnsweringGrid([1, 2, 3], nodes_answer(lambda n: partition_report(n, fingerprint="0" * 32 if n == 3 else SERVER_BASE)))
    a = admission()
    a.settings = Settings.from_flat({"compression": "sparsegpt:0.75"})
    with caplog.at_level(logging.WARNING):
        discover(grid, a, 2, timeout=1.0)
    assert a.left_out == {3} and sorted(a.reports) == [1, 2]
    [line] = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert f"node 3 is left out: its base has fingerprint {'0' * 32}, the server's {SERVER_BASE}" in line
    assert "mops compress --model smollm2 --compression sparsegpt:0.75 --export DIR" in line and "model=\"DIR\"" in line
    s = strategy(admission=a, fraction_train=1.0, min_available_nodes=3)
    assert all(3 not in s.sample(grid, r) for r in (1, 2, 3))
    with pytest.raises(RuntimeError, match=r"only 2 of the 3 connected nodes can train and min-available-nodes is 3: node 3: its base"):
        discover(grid, admission(), 3, timeout=1.0)


def test_the_input_prompts_are_sent_once_only_to_nodes_that_lack_them_and_a_refusal_leaves_the_node_out(server_identity, caplog):
    from mops_core.model import INPUT_PROMPTS
    from server.app import discover
    from server.protocol import START_STATE

    lacking = {2, 3}
    grid = AnsweringGrid([1, 2, 3], nodes_answer(
        lambda n: partition_report(n, has_prompts=n not in lacking),
        lambda n: reply(n, error="StartStateError: the input prompts received do not match their hash") if n == 3 else reply_ok(n),
    ))
    a = admission()
    with caplog.at_level(logging.WARNING):
        discover(grid, a, 2, timeout=1.0)
    sent = [m for m in grid.sent if m.metadata.message_type == START_STATE]
    assert sorted(m.metadata.dst_node_id for m in sent) == [2, 3]
    assert torch.equal(torch.from_numpy(sent[0].content["arrays"][INPUT_PROMPTS].numpy()), PROMPTS)
    assert sent[0].content["config"]["input-prompts-sha"] == a.sha
    assert a.left_out == {3} and sorted(a.reports) == [1, 2] and a.prompts_sent == 1
    assert "node 3 is left out: it could not store the input prompts" in caplog.text


def test_a_node_that_connects_later_is_admitted_before_it_is_first_sampled(server_identity):
    from server.app import discover

    grid = AnsweringGrid([1, 2], nodes_answer(lambda n: partition_report(n, fingerprint="0" * 32 if n == 4 else SERVER_BASE)))
    a = admission()
    discover(grid, a, 2, timeout=1.0)
    s = strategy(admission=a, fraction_train=1.0, min_available_nodes=2)
    assert sorted(s.sample(grid, 1)) == [1, 2]
    grid.nodes = [1, 2, 3, 4]  # 3 joins with the server's base, 4 with another
    queried = len(grid.sent)
    assert sorted(s.sample(grid, 2)) == [1, 2, 3] and a.partitions[3] == 3 and a.left_out == {4}
    assert sorted(m.metadata.dst_node_id for m in grid.sent[queried:]) == [3, 4]  # only the newcomers were asked
    s.sample(grid, 3)
    assert len(grid.sent) == queried + 2  # and only once


def test_discovery_names_the_tasks_the_run_does_not_know_once(server_identity, caplog):
    from server.app import discover

    grid = AnsweringGrid([1, 2, 3], nodes_answer(lambda n: partition_report(n, {"rewrite": 5, "poetry": 1} if n != 2 else {})))
    a = admission()
    with caplog.at_level(logging.WARNING):
        discover(grid, a, 3, timeout=1.0)
    assert not a.left_out and a.reports[1].unknown_tasks == {"rewrite": 5, "poetry": 1} and not a.reports[2].unknown_tasks
    named = [r.getMessage() for r in caplog.records if "does not know" in r.getMessage()]
    assert named == ["nodes hold tasks the run does not know; they train on them and the gate routes them: "
                     "poetry (2 records), rewrite (10 records)"]


def test_discovery_stops_the_run_with_the_nodes_reason_when_too_few_can_train(server_identity):
    from server.app import discover

    # Flower wraps a ClientApp's exception: the cause is the reason's last line.
    reason = "\nException ClientAppException occurred. Message: no Dirichlet(alpha=0.5) split of 15 samples"
    grid = AnsweringGrid([1, 2, 3], nodes_answer(lambda n: reply(n, error=reason)))
    with pytest.raises(RuntimeError, match=r"only 0 of the 3 connected nodes can train .*: node 1, 2, 3: Exception ClientAppException occurred. Message: no Dirichlet") as err:
        discover(grid, admission(), 3, timeout=1.0)
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

    rounds = lambda **kw: [n for n in range(0, 7) if FederatedConfig(num_server_rounds=6, **kw).costly_scores_due(n)]  # noqa: E731
    assert rounds() == [6]  # the default: the last round only
    assert rounds(metrics_every=2) == [0, 2, 4, 6]  # the start too, as the baseline of the curve
    assert rounds(metrics_every=4) == [0, 4, 6]


def started_round(s, global_arrays, nodes=(1, 2, 3, 4)):
    """`s` after configure_train of round 1 from `global_arrays` (the state updates are measured from)."""
    grid = FakeGrid(dict(zip(nodes, range(len(nodes)))))
    admitted({n: p for n, p in grid.nodes.items() if n not in s.admission.reports}, admission=s.admission)
    list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in global_arrays.items()}), ConfigRecord({}), grid))
    return s


def moved(base, seed, scale):
    """`base` plus a random step of L2 norm `scale` over all arrays."""
    step = arrays(seed)
    norm = np.sqrt(sum(np.sum(v.astype(np.float64) ** 2) for v in step.values()))
    return {k: (base[k] + step[k] * (scale / norm)).astype(np.float32) for k in base}


@pytest.mark.parametrize("bound", [(2.0, False), (3.0, True)])
def test_an_update_beyond_the_norm_bound_is_dropped_with_its_node_and_changes_nothing(bound, server_identity, caplog):
    base = arrays(0)
    honest = [reply(n, moved(base, n, 1.0 + 0.1 * n), metrics(10)) for n in (1, 2, 3)]
    scaled = reply(4, moved(base, 4, 50.0), metrics(10))  # well-formed, finite, fifty times too far
    clean, _ = started_round(strategy(partitions={1: 0, 2: 1, 3: 2, 4: 3}), base).aggregate_train(1, honest)
    s = started_round(strategy(partitions={1: 0, 2: 1, 3: 2, 4: 3}, norm_bound=bound), base)
    with caplog.at_level(logging.WARNING):
        kept, _ = s.aggregate_train(1, [*honest, scaled])
    for key in SHAPES:
        np.testing.assert_array_equal(kept[key].numpy(), clean[key].numpy())
    log = s.rounds[1]
    assert log.accepted == 3 and log.update_norm_median == pytest.approx(1.25, rel=1e-6)  # median of 1.1, 1.2, 1.3, 50
    what = "3x the round's median 1.25" if bound[1] else "2"
    assert f"dropping the reply of node 4 (partition 3): its update's norm 50 exceeds update-norm-bound ({what})" in caplog.text
    unbounded = started_round(strategy(partitions={1: 0, 2: 1, 3: 2, 4: 3}), base)
    assert unbounded.aggregate_train(1, [*honest, scaled])[0] is not None and unbounded.rounds[1].accepted == 4
    # Every update oversized: nothing is averaged, the global state stays.
    alone = started_round(strategy(norm_bound=(2.0, False)), base)
    assert alone.aggregate_train(1, [scaled]) == (None, None) and alone.rounds[1].accepted == 0


def test_the_norm_bound_setting_parses_absolute_and_relative_bounds_and_names_itself_when_wrong():
    from mops_core.config import FederatedConfig
    from mops_core.parsing import SettingsError

    assert FederatedConfig().norm_bound is None
    assert FederatedConfig(update_norm_bound="0.5").norm_bound == (0.5, False)
    assert FederatedConfig(update_norm_bound="3x").norm_bound == (3.0, True)
    for wrong in ("abc", "-1", "0.5x", "nan"):
        with pytest.raises(SettingsError, match="update-norm-bound"):
            FederatedConfig(update_norm_bound=wrong)
    with pytest.raises(SettingsError, match="dp-noise.*needs dp-clip"):
        FederatedConfig(dp_noise=1.0)


def clipped(update, base, clip):
    """An update's step from `base`, scaled to L2 norm `clip` when longer: what Flower's clipping should give."""
    norm = np.sqrt(sum(np.sum((update[k].astype(np.float64) - base[k]) ** 2) for k in base))
    return {k: base[k] + (update[k] - base[k]) * min(1.0, clip / norm) for k in base}


def test_server_side_dp_clips_each_screened_update_before_the_average_and_a_malformed_one_is_dropped_not_fatal(server_identity, caplog):
    from mops_core.config import FederatedConfig
    from server.privacy import ServerSideDP, with_privacy

    base = arrays(0)
    updates = {1: moved(base, 1, 0.5), 2: moved(base, 2, 4.0), 3: moved(base, 3, 9.0)}
    inner = strategy(partitions={1: 0, 2: 1, 3: 2, 4: 3})
    with caplog.at_level(logging.INFO):
        dp = with_privacy(inner, FederatedConfig(dp_clip=2.0, dp_noise=0.0), sampled=4)
    assert isinstance(dp, ServerSideDP) and "fixed clipping to L2 norm 2, noise multiplier 0, 4 clients per round" in caplog.text
    dp.configure_train(1, ArrayRecord({k: Array(v) for k, v in base.items()}), ConfigRecord({}), FakeGrid({1: 0, 2: 1, 3: 2, 4: 3}))
    malformed = reply(4, {**base, "prompts": np.zeros((1, 2, 4), np.float32)}, metrics(10))
    averaged, _ = dp.aggregate_train(1, [reply(n, u, metrics(10)) for n, u in updates.items()] + [malformed])
    reference = {k: np.mean([clipped(u, base, 2.0)[k] for u in updates.values()], axis=0) for k in base}
    for key, value in reference.items():
        np.testing.assert_allclose(averaged[key].numpy(), value, rtol=1e-5, atol=1e-6)
    assert inner.rounds[1].accepted == 3 and "node 4" in inner.rounds[1].dropped[0]

    noisy = with_privacy(strategy(partitions={1: 0, 2: 1, 3: 2}), FederatedConfig(dp_clip=2.0, dp_noise=1.5), sampled=3)
    noisy.configure_train(1, ArrayRecord({k: Array(v) for k, v in base.items()}), ConfigRecord({}), FakeGrid({1: 0, 2: 1, 3: 2}))
    np.random.seed(0)
    out, _ = noisy.aggregate_train(1, [reply(n, u, metrics(10)) for n, u in updates.items()])
    noise = np.concatenate([(out[k].numpy() - reference[k]).ravel() for k in reference])
    assert noise.std() == pytest.approx(1.5 * 2.0 / 3, rel=0.25)  # z x C / m
    assert with_privacy(inner, FederatedConfig(), sampled=4) is inner  # dp-clip 0: no wrapper


def test_client_side_clipping_applies_only_when_the_server_asks_for_it():
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    from client.app import clip_when_asked

    base = arrays(0)
    far = moved(base, 5, 10.0)

    def run(config):
        sent = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in base.items()}), "config": ConfigRecord(config)}),
                       metadata=metadata(0, MessageType.TRAIN))
        answer = lambda msg, ctx: Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in far.items()}),  # noqa: E731
                                                      "metrics": MetricRecord(metrics(5))}), reply_to=msg)
        out = clip_when_asked(sent, None, answer).content["arrays"]
        return np.sqrt(sum(np.sum((out[k].numpy().astype(np.float64) - base[k]) ** 2) for k in base))

    assert run({"server-round": 1}) == pytest.approx(10.0, rel=1e-5)
    assert run({"server-round": 1, KEY_CLIPPING_NORM: 2.0}) == pytest.approx(2.0, rel=1e-5)


def test_a_node_the_superlink_lost_is_named_and_asked_again_when_it_is_next_connected(server_identity, caplog):
    from server.app import discover

    answer = lambda m: partition_report(m.metadata.dst_node_id)  # noqa: E731
    grid = AnsweringGrid([11, 12, 13], lambda m: unavailable(m) if m.metadata.dst_node_id == 12 else answer(m))
    a = admission()
    with caplog.at_level(logging.WARNING):
        discover(grid, a, 2, timeout=1.0)
    assert not a.left_out and sorted(a.reports) == [11, 13] and list(a.unanswered) == [12]  # the SuperLink's error, charged to 12
    assert "node 12 did not answer (Error: Node Unavailable); it is asked again when it is next connected" in caplog.text
    s = strategy(admission=a, fraction_train=1.0, min_available_nodes=2)
    assert 12 not in s.sample(grid, 1)  # still unanswered: not sampled
    grid.answer = answer  # node 12 is back
    assert sorted(s.sample(grid, 2)) == [11, 12, 13] and not a.unanswered
    sent = list(s.configure_train(1, ArrayRecord({k: Array(v) for k, v in arrays(0).items()}), ConfigRecord({}), grid))
    for m in sent:  # as the grid does when it pushes them
        m.metadata.__dict__["_message_id"] = m.object_id
    [to_13] = [m for m in sent if m.metadata.dst_node_id == 13]
    with caplog.at_level(logging.WARNING):
        s.aggregate_train(1, [reply(11, arrays(1), metrics(4)), unavailable(to_13)])
    assert "node 13 (partition 13) failed: Error: Node Unavailable" in caplog.text and s.rounds[1].failed == 1


def test_each_round_records_how_the_prompt_updates_agree(server_identity):
    """Opposed prompt updates: cosine -1 and a norm ratio of 0 over the whole tensor; per expert by gate the
    same replies agree where the clients share an expert. The gate's own arrays do not count."""
    base = arrays(0)
    step = arrays(9)["prompts"]
    pulls = {1: step, 2: -step}
    replies = [reply(n, {**arrays(n), "prompts": base["prompts"] + pulls[n]}, {"num-examples": 10, "train-loss": 1.0}) for n in pulls]
    s = started_round(strategy(), base, nodes=(1, 2))
    s.aggregate_train(1, replies)
    assert s.rounds[1].agreement == pytest.approx({"cosine": -1.0, "norm_ratio": 0.0}, abs=1e-6)

    same_expert0 = base["prompts"].copy()
    same_expert0[0] += step[0]
    replies = [reply(n, {**arrays(n), "prompts": same_expert0 + (n - 1.5) * np.eye(3)[2][:, None, None] * step},
                     {**metrics(10), "gate": [0.5, 0.0, 0.5] if n == 1 else [0.9, 0.1, 0.0]}) for n in (1, 2)]
    s = started_round(strategy(), base, nodes=(1, 2))
    s.aggregate_train(1, replies)
    # Expert 0 (both clients, the same step): cosine 1; expert 2 (only client 1 used it) has no pair;
    # expert 1: zero update for both. Pooled: 1.
    assert s.rounds[1].agreement["cosine"] == pytest.approx(1.0)


def test_a_node_that_lost_its_input_prompts_mid_run_is_sent_them_again_before_it_is_next_sampled(server_identity, caplog):
    from mops_core.start_state import LACKS_INPUT_PROMPTS
    from server.protocol import START_STATE
    from server.app import discover

    holding = {1, 2, 3, 4}
    grid = AnsweringGrid([1, 2, 3, 4], nodes_answer(lambda n: partition_report(n, has_prompts=n in holding),
                                                    lambda n: holding.add(n) or reply_ok(n)))
    a = admission()
    discover(grid, a, 4, timeout=1.0)
    s = strategy(admission=a, fraction_train=1.0, fraction_evaluate=1.0, min_available_nodes=4)
    assert sorted(s.sample(grid, 1)) == [1, 2, 3, 4] and a.prompts_sent == 0
    holding -= {2, 4}  # their caches pruned between rounds
    lacking = lambda n: f"StartStateError: {LACKS_INPUT_PROMPTS} ({a.sha}): /cache/{n} is not in its cache"  # noqa: E731
    with caplog.at_level(logging.WARNING):
        s.aggregate_train(1, [reply(1, arrays(1), metrics(4)), reply(2, error=lacking(2)), reply(3, error="out of memory")])
        s.aggregate_evaluate(1, [reply(4, error=lacking(4))])
    assert "node 2 lacks the input prompts it was sent; it is admitted again" in caplog.text
    asked = len(grid.sent)
    assert sorted(s.sample(grid, 2)) == [1, 2, 3, 4]
    again = [(m.metadata.dst_node_id, m.metadata.message_type) for m in grid.sent[asked:]]
    assert sorted(again) == [(2, MessageType.QUERY), (2, START_STATE), (4, MessageType.QUERY), (4, START_STATE)]
    assert holding == {1, 2, 3, 4} and a.prompts_sent == 2  # a node that failed for another reason is not asked again
