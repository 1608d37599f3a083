"""Rounds that end for a reason: Flower's Grid, with a `send_and_receive` that stops waiting for what cannot come.

Flower's own `send_and_receive` waits until every reply is in or `timeout` passes. In a real
federation nodes die, restart and lag: a SuperNode restarted mid-round comes back as the same
node, connected, yet its new process never saw the message its old one was working on, so the
round would wait the full `round-timeout` for a reply that never comes; one slow node holds
every round to its pace. `RoundGrid` wraps the Grid the strategy is handed and ends a round

- when every reply is in ("all in");
- when every node still owed is gone ("gone"): no longer among the SuperLink's connected nodes,
  reconnected since the message went out (a restarted SuperNode), or reported unavailable by
  the SuperLink itself;
- once at least `min-replies` replies are in, when `round-deadline` has passed ("deadline"): a
  number of seconds after the messages went out, or N times the median time of this round's
  replies so far ("3x"), so a straggler cannot hold the others (training and evaluation only:
  admitting nodes waits for every node that is still there);
- at `round-timeout` ("timeout").

Each reply not waited for is dropped with a log line naming its node and why, and the round's
account (`Replies`) says how many were awaited, received and dropped, and why the round ended.
Only replies to this round's messages count: one that arrives after its round ended is pulled
in a later round, logged and dropped ("late"), never mixed into that round's average.
"""

from __future__ import annotations

import datetime
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from logging import WARNING

from flwr.app import Message, MessageType
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from mops_core.config import FederatedConfig

POLL_SECONDS = 1.0  # between pulls: replies and the node list are asked for this often
ROUND_TYPES = (MessageType.TRAIN, MessageType.EVALUATE)  # the deadline is for rounds, not for admitting nodes


@dataclass
class Replies:
    """One `send_and_receive`: what was awaited, what came, what was dropped and why, why it ended."""

    message_type: str
    group: str  # the messages' group_id: the strategy stamps its round number there
    awaited: int
    received: int = 0
    gone: list[int] = field(default_factory=list)  # nodes whose replies were dropped as gone
    late: list[int] = field(default_factory=list)  # nodes still owed when the deadline or the timeout ended the round
    stale: list[int] = field(default_factory=list)  # nodes whose reply to an earlier round came during this one
    ended: str = "all in"  # all in | gone | deadline | timeout
    seconds: float = 0.0  # from the push to the end of waiting
    deadline: float | None = None  # seconds after the push the deadline stood at when the round ended (None: none yet)

    def to_row(self) -> dict:
        """For results.json: the counts, the nodes dropped and why the round ended."""
        return {k: v for k, v in asdict(self).items() if k not in ("message_type", "group")}


@dataclass(frozen=True)
class ReplyRule:
    """When a round stops waiting: `round-timeout`, `round-deadline` and `min-replies` (FederatedConfig)."""

    timeout: float
    deadline: tuple[float, bool] | None = None
    min_replies: int = 1

    @classmethod
    def of(cls, fed: FederatedConfig) -> ReplyRule:
        return cls(fed.round_timeout, fed.deadline, fed.min_replies)

    def deadline_at(self, reply_seconds: list[float]) -> float | None:
        """Seconds after the messages went out at which the round stops waiting, given the seconds each
        reply took so far; None before `min-replies` replies are in, or without a deadline."""
        if self.deadline is None or len(reply_seconds) < self.min_replies:
            return None
        value, relative = self.deadline
        return value * statistics.median(reply_seconds) if relative else value


def _activated_at(node) -> float | None:
    """When the SuperLink last saw this node connect (NodeInfo.last_activated_at, ISO 8601), as a Unix time."""
    text = getattr(node, "last_activated_at", "") or ""
    try:
        return datetime.datetime.fromisoformat(text).timestamp() if text else None
    except ValueError:
        return None


class RoundGrid(Grid):
    """The Grid the strategy is handed, with rounds that end for a reason (module docstring).

    `on_end` gets each `send_and_receive`'s `Replies`; `clock`/`wall`/`sleep` are injectable so the
    rules can be tested without waiting.
    """

    def __init__(self, grid: Grid, rule: ReplyRule, on_end: Callable[[Replies], None] | None = None, *,
                 poll: float = POLL_SECONDS, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> None:
        self.grid = grid
        self.rule = rule
        self.on_end = on_end
        self.poll, self.clock, self.wall, self.sleep = poll, clock, wall, sleep
        self.ended: dict[str, tuple[int, str]] = {}  # message id -> (node, group) of replies no longer waited for

    # Everything but send_and_receive is the wrapped Grid's.
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        first = messages[0].metadata
        pushed_wall, started = self.wall(), self.clock()
        pushed = {str(i) for i in self.push_messages(messages) if i}  # the grid gives each message its id
        owed = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id in pushed}
        replies = Replies(first.message_type, first.group_id, awaited=len(messages))
        for m in messages:
            if m.metadata.message_id not in pushed:  # the SuperLink refused it: nothing will come
                replies.gone.append(m.metadata.dst_node_id)
                log(WARNING, "the %s message to node %d could not be pushed: dropped", first.message_type, m.metadata.dst_node_id)
        del messages
        timeout = self.rule.timeout if timeout is None else min(timeout, self.rule.timeout)
        received: list[Message] = []
        took: list[float] = []  # seconds each reply took
        gone: set[str] = set()
        while True:
            for msg in self.pull_messages(list(owed) + list(self.ended)):
                asked = msg.metadata.reply_to_message_id
                if asked in self.ended:
                    node, group = self.ended.pop(asked)
                    if not msg.has_error():  # errors here: the SuperLink gave up on it (node gone, message expired)
                        replies.stale.append(node)
                        log(WARNING, "node %d replied to %s round %s after that round ended: dropped", node,
                            replies.message_type, group)
                elif asked in owed:
                    node = owed.pop(asked)
                    gone.discard(asked)
                    if msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE:
                        replies.gone.append(node)
                        if replies.message_type in ROUND_TYPES:
                            log(WARNING, "node %d is unavailable (the SuperLink says so): its reply is dropped", node)
                        else:  # admission names the node and asks it again when it is next connected
                            received.append(msg)
                        continue
                    received.append(msg)
                    took.append(self.clock() - started)
            elapsed = self.clock() - started
            if not owed:
                break
            gone |= self._gone(owed, pushed_wall)
            if gone >= set(owed):
                replies.ended = "gone"
                break
            if replies.message_type in ROUND_TYPES:
                replies.deadline = self.rule.deadline_at(took)
                if replies.deadline is not None and elapsed >= replies.deadline:
                    replies.ended = "deadline"
                    break
            if elapsed >= timeout:
                replies.ended = "timeout"
                break
            self.sleep(self.poll)
        for message_id, node in owed.items():
            (replies.gone if message_id in gone else replies.late).append(node)
            self.ended[message_id] = (node, replies.group)
        if owed:
            why = {"gone": "gone", "deadline": "past the round's deadline", "timeout": "past round-timeout"}[replies.ended]
            log(WARNING, "%s round %s ended (%s) after %.1f s with %d of %d replies: dropped %s", replies.message_type,
                replies.group, replies.ended, elapsed, len(received), replies.awaited,
                ", ".join(f"node {node} ({'gone' if mid in gone else why})" for mid, node in sorted(owed.items(), key=lambda i: i[1])))
        if replies.ended == "all in" and replies.gone:  # what was still owed came back as the SuperLink's word that it is gone
            replies.ended = "gone"
        replies.received = len(received)
        replies.seconds = elapsed
        if self.on_end is not None:
            self.on_end(replies)
        return received

    def _gone(self, owed: dict[str, int], pushed_wall: float) -> set[str]:
        """The owed messages whose nodes are gone: not connected, or connected again since the push."""
        nodes = {getattr(n, "node_id", n): n for n in self.get_nodes()}
        gone = set()
        for message_id, node in owed.items():
            info = nodes.get(node)
            activated = _activated_at(info) if info is not None else None
            if info is None or (activated is not None and activated > pushed_wall):
                gone.add(message_id)
        return gone


__all__ = ["POLL_SECONDS", "Replies", "ReplyRule", "RoundGrid"]
