"""Rounds that end for a reason (server/rounds.py), on a fake SuperLink with a fake clock: no waiting, no network.

The fake link holds each pushed message until its node's reply is due (seconds after the push), hands
replies out only for the ids asked for and forgets them once pulled, as the SuperLink does; nodes
go offline, restart (connect again, as the same node) or straggle when a test says so.
"""

import datetime
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, Metadata, MetricRecord, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from test_strategy import SHAPES, arrays, metrics, strategy

from mops_core.config import FederatedConfig
from server.rounds import ReplyRule, RoundGrid


class Clock:
    def __init__(self):
        self.now = 0.0

    def sleep(self, seconds):
        self.now += seconds

    def wall(self):
        return 1_800_000_000.0 + self.now


class FakeLink:
    """`due[node]`: seconds from push to its reply (None: it never replies); `answer(message)`: the reply's content."""

    def __init__(self, clock, nodes, due, answer=None):
        self.clock, self.due = clock, dict(due)
        self.online = {node: clock.wall() - 100 for node in nodes}  # node -> when it last connected
        self.answer = answer or (lambda m: RecordDict({"metrics": MetricRecord({"ok": 1})}))
        self.pending = {}  # message id -> (message, when its reply is due)
        self.unavailable_errors = False  # the SuperLink's own NODE_UNAVAILABLE reply for an offline node
        self.events = []  # (time, action, node): go offline / restart at a time

    def tick(self):
        for when, action, node in [e for e in self.events if e[0] <= self.clock.now]:
            self.events.remove((when, action, node))
            if action == "offline":
                self.online.pop(node, None)
            else:  # "restart": the node connects again; what its old process was doing is lost
                self.online[node] = self.clock.wall()
                for mid, (msg, _) in list(self.pending.items()):
                    if msg.metadata.dst_node_id == node:
                        self.pending[mid] = (msg, None)

    def get_node_ids(self):
        self.tick()
        return list(self.online)

    def get_nodes(self):
        self.tick()
        return [NodeInfo(node_id=n, last_activated_at=datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat())
                for n, t in self.online.items()]

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            due = self.due.get(m.metadata.dst_node_id)
            self.pending[m.object_id] = (m, None if due is None else self.clock.now + due)
            ids.append(m.object_id)
        return ids

    def pull_messages(self, message_ids):
        self.tick()
        out = []
        for mid in message_ids:
            if mid not in self.pending:
                continue
            msg, due = self.pending[mid]
            node = msg.metadata.dst_node_id
            if due is not None and due <= self.clock.now:
                out.append(Message(self.answer(msg), metadata=reply_metadata(msg, node)))
            elif self.unavailable_errors and node not in self.online:
                out.append(Message(error=Error(code=5, reason="Error: Node Unavailable"), metadata=reply_metadata(msg, 1)))
            else:
                continue
            del self.pending[mid]
        return out


def reply_metadata(message, source):
    return Metadata(run_id=1, message_id=f"r-{message.object_id}", src_node_id=source, dst_node_id=0,
                    reply_to_message_id=message.object_id, group_id=message.metadata.group_id, created_at=0.0, ttl=60.0,
                    message_type=message.metadata.message_type)


def send(grid, nodes, group="1", message_type=MessageType.TRAIN):
    messages = [Message(RecordDict({"config": ConfigRecord({"n": n})}), dst_node_id=n, message_type=message_type, group_id=group)
                for n in nodes]
    return grid.send_and_receive(messages, timeout=None)


def round_grid(link, clock, timeout=3600.0, deadline="", min_replies=1):
    accounts = []
    rule = ReplyRule.of(FederatedConfig(round_timeout=timeout, round_deadline=deadline, min_replies=min_replies))
    grid = RoundGrid(link, rule, accounts.append, clock=lambda: clock.now, wall=clock.wall, sleep=clock.sleep)
    return grid, accounts


def sources(replies):
    return sorted(r.metadata.src_node_id for r in replies)


def test_a_round_ends_when_every_reply_is_in_and_says_so(server_identity):
    clock = Clock()
    link = FakeLink(clock, [1, 2, 3], {1: 2.0, 2: 5.0, 3: 9.0})
    grid, accounts = round_grid(link, clock)
    assert sources(send(grid, [1, 2, 3])) == [1, 2, 3]
    [account] = accounts
    assert (account.awaited, account.received, account.ended, account.gone, account.late) == (3, 3, "all in", [], [])
    assert 9.0 <= account.seconds <= 10.0


def test_a_node_that_dies_mid_round_is_dropped_within_a_poll_not_after_round_timeout(server_identity, caplog):
    clock = Clock()
    link = FakeLink(clock, [1, 2, 3], {1: 2.0, 2: None, 3: 4.0})
    link.events.append((6.0, "offline", 2))  # its heartbeats stop; the SuperLink drops it from the connected nodes
    grid, accounts = round_grid(link, clock, timeout=3600.0)
    with caplog.at_level(logging.WARNING):
        assert sources(send(grid, [1, 2, 3])) == [1, 3]
    [account] = accounts
    assert account.ended == "gone" and account.gone == [2] and account.late == [] and account.received == 2
    assert 6.0 <= account.seconds <= 7.0  # one poll after it went, not the hour of round-timeout
    assert "node 2 (gone)" in caplog.text


def test_the_superlinks_own_unavailable_reply_counts_as_gone_not_as_a_reply(server_identity):
    clock = Clock()
    link = FakeLink(clock, [1, 2], {1: 2.0, 2: None})
    link.unavailable_errors = True
    link.events.append((3.0, "offline", 2))
    grid, accounts = round_grid(link, clock)
    assert sources(send(grid, [1, 2])) == [1]
    assert accounts[0].gone == [2] and accounts[0].received == 1 and accounts[0].seconds < 5.0
    assert accounts[0].ended == "gone"  # nothing that could still come was owed: not "all in"


def test_admission_still_sees_the_superlinks_unavailable_reply_so_it_can_name_the_node(server_identity):
    clock = Clock()
    link = FakeLink(clock, [1, 2], {1: 1.0, 2: None})
    link.unavailable_errors = True
    link.events.append((2.0, "offline", 2))
    grid, accounts = round_grid(link, clock)
    got = send(grid, [1, 2], group="", message_type=MessageType.QUERY)
    assert sorted(r.metadata.src_node_id for r in got) == [1, 1]  # the node's report, and the SuperLink's error (its id)
    assert [r.error.code for r in got if r.has_error()] == [5] and accounts[0].gone == [2]


def test_a_node_restarted_mid_round_is_gone_though_connected_and_is_sampled_again_later(server_identity):
    clock = Clock()
    link = FakeLink(clock, [1, 2, 3], {1: 2.0, 2: 8.0, 3: 3.0})
    link.events.append((4.0, "restart", 2))  # a supervisor starts it again: the same node, a new process
    grid, accounts = round_grid(link, clock)
    assert sources(send(grid, [1, 2, 3], group="1")) == [1, 3]
    assert accounts[0].ended == "gone" and accounts[0].gone == [2] and accounts[0].seconds < 6.0
    assert 2 in grid.get_node_ids()  # connected: the strategy samples it as any other node
    assert sources(send(grid, [2, 3], group="2")) == [2, 3] and accounts[1].ended == "all in"


def test_the_deadline_after_min_replies_drops_a_straggler_at_three_times_the_median(server_identity, caplog):
    clock = Clock()
    due = {1: 2.0, 2: 4.0, 3: 6.0, 4: 500.0}
    grid, accounts = round_grid(FakeLink(clock, due, due), clock, deadline="3x", min_replies=3)
    with caplog.at_level(logging.WARNING):
        assert sources(send(grid, [1, 2, 3, 4])) == [1, 2, 3]
    [account] = accounts
    assert account.ended == "deadline" and account.late == [4] and account.gone == []
    assert account.deadline == 12.0 and 12.0 <= account.seconds <= 13.0  # 3 x the median (4 s) of the replies in
    assert "node 4 (past the round's deadline)" in caplog.text


def test_the_deadline_waits_for_min_replies_and_an_absolute_deadline_counts_from_the_push(server_identity):
    clock = Clock()
    due = {1: 2.0, 2: 30.0, 3: 500.0}
    grid, accounts = round_grid(FakeLink(clock, due, due), clock, deadline="10", min_replies=2)
    assert sources(send(grid, [1, 2, 3])) == [1, 2]
    assert accounts[0].ended == "deadline" and accounts[0].late == [3] and 30.0 <= accounts[0].seconds <= 31.0
    clock = Clock()
    grid, accounts = round_grid(FakeLink(clock, due, due), clock, deadline="10", min_replies=1)
    assert sources(send(grid, [1, 2, 3])) == [1]
    assert accounts[0].late == [2, 3] and 10.0 <= accounts[0].seconds <= 11.0
    clock = Clock()
    grid, accounts = round_grid(FakeLink(clock, due, due), clock, timeout=100.0, deadline="10", min_replies=3)
    assert sources(send(grid, [1, 2, 3])) == [1, 2]
    assert accounts[0].ended == "timeout" and accounts[0].late == [3] and 100.0 <= accounts[0].seconds <= 101.0


def test_no_deadline_for_admission_queries_and_none_unless_set(server_identity):
    clock = Clock()
    due = {1: 1.0, 2: 50.0}
    grid, accounts = round_grid(FakeLink(clock, due, due), clock, deadline="3x")
    assert sources(send(grid, [1, 2], group="", message_type=MessageType.QUERY)) == [1, 2]
    clock = Clock()
    grid, accounts = round_grid(FakeLink(clock, due, due), clock)
    assert sources(send(grid, [1, 2])) == [1, 2] and accounts[0].ended == "all in"


def test_a_late_reply_to_round_r_arriving_during_round_r_plus_1_is_dropped_never_mixed_in(server_identity, caplog):
    clock = Clock()
    link = FakeLink(clock, [1, 2, 3], {1: 1.0, 2: 2.0, 3: 30.0})
    grid, accounts = round_grid(link, clock, deadline="3x", min_replies=2)
    assert sources(send(grid, [1, 2, 3], group="1")) == [1, 2] and accounts[0].late == [3]
    link.due[3] = 1.0  # in round 2 it is quick; its round-1 reply (due at 30 s) comes meanwhile
    link.due[1] = 28.0
    with caplog.at_level(logging.WARNING):
        second = send(grid, [1, 3], group="2")
    assert sources(second) == [1, 3] and all(r.metadata.group_id == "2" for r in second)
    assert accounts[1].stale == [3] and accounts[1].received == 2
    assert "node 3 replied to train round 1 after that round ended: dropped" in caplog.text
    assert not grid.ended  # nothing more is owed from round 1


def test_the_average_is_that_of_exactly_the_replies_recorded_as_received(server_identity):
    mapping = {11: 0, 12: 1, 13: 2, 14: 3, 15: 4}
    updates = {node: arrays(node) for node in mapping}
    weights = {11: 5, 12: 7, 13: 11, 14: 13, 15: 17}
    clock = Clock()
    due = {11: 1.0, 12: 2.0, 13: 3.0, 14: None, 15: 400.0}  # 14 dies, 15 straggles past the deadline
    link = FakeLink(clock, mapping, due, answer=lambda m: RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in updates[m.metadata.dst_node_id].items()}),
        "metrics": MetricRecord(metrics(weights[m.metadata.dst_node_id]))}))
    link.events.append((1.5, "offline", 14))
    s = strategy(partitions=mapping, fraction_train=1.0, min_available_nodes=4)
    grid, _ = round_grid(link, clock, deadline="3x", min_replies=2)
    grid.on_end = s.note_replies
    start = ArrayRecord({k: Array(v) for k, v in arrays(0).items()})
    result = s.start(grid, start, num_rounds=1, timeout=3600.0)
    record = s.rounds[1].replies
    assert record["ended"] == "deadline" and record["gone"] == [14] and record["late"] == [15] and record["received"] == 3
    assert s.rounds[1].accepted == 3 and s.rounds[1].sampled == 5
    received = [11, 12, 13]
    total = sum(weights[n] for n in received)
    for key in SHAPES:
        expected = sum(updates[n][key].astype(np.float64) * weights[n] / total for n in received)
        np.testing.assert_allclose(result.arrays[key].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_round_deadline_and_min_replies_are_checked_with_the_key_named():
    with pytest.raises(ValueError, match="round-deadline"):
        FederatedConfig(round_deadline="soon")
    with pytest.raises(ValueError, match="round-deadline"):
        FederatedConfig(round_deadline="0.5x")
    with pytest.raises(ValueError, match="min-replies"):
        FederatedConfig(min_replies=0)
    assert FederatedConfig(round_deadline="3x").deadline == (3.0, True) and FederatedConfig(round_deadline="90").deadline == (90.0, False)


def test_the_progress_line_and_the_tracker_say_what_a_round_dropped_and_nothing_when_it_dropped_nothing():
    from server.history import progress_line, round_scalars

    row = {"round": 3, "perplexity": 9.5, "sampled": 4, "accepted": 2, "failed": 0, "dropped": [], "bytes_down": 0, "bytes_up": 0,
           "replies": {"awaited": 4, "received": 2, "gone": [12], "late": [14], "stale": [], "ended": "deadline",
                       "seconds": 12.4, "deadline": 12.0}}
    assert "training ended (deadline) after 12 s: node 12 gone, node 14 late" in progress_line(row)
    scalars = round_scalars(row)
    assert (scalars["replies/gone"], scalars["replies/late"], scalars["seconds/waiting"]) == (1, 1, 12.4)
    quiet = {**row, "replies": {**row["replies"], "gone": [], "late": [], "ended": "all in"}}
    assert "ended" not in progress_line(quiet)
