"""What a node must show before it trains, and what it is given.

    query              -> its data (partition, counts per task), its base's fingerprint,
                          whether it holds the run's frozen input prompts
    query.start_state  -> the input prompts, to a node that lacks them (hash-checked there); again
                          to a node whose training or evaluation fails for want of them

A node that cannot read its data or load its base, or whose base differs from the server's, is
left out with one log line that says why and what to do; it is never sampled. A node that did
not answer (it vanished, or the SuperLink lost it) is not left out: it is asked again when it is
next connected. Nodes are admitted at discovery, and a node that connects later (a new one, or
one that restarted under a new id) is admitted before it is first sampled.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid

from mops_core.config import Settings
from mops_core.model import INPUT_PROMPTS
from mops_core.start_state import LACKS_INPUT_PROMPTS

from . import protocol
from .protocol import NodeReport

# Errors about the node's reachability, not about the node: it is asked again later.
UNREACHABLE = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


def answering_node(reply: Message, sent: list[Message]) -> int:
    """The node a reply answers for. An error the SuperLink makes itself (a node that stopped sending
    heartbeats) comes from the SuperLink's own id; the message it answers names the node."""
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    return asked.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def provisioning_hint(settings: Settings) -> str:
    """How an operator gives a node the server's base."""
    model, compression = settings.model.model, settings.compression.compression
    if compression == "none" or compression.startswith("int8"):
        return f"start it with the server's model ({model!r}) and compression ({compression})"
    return (f"export the server's base with `mops compress --model {model} --compression {compression} --export DIR` "
            f"(and the run's other settings) and start the node with --node-config 'model=\"DIR\"'")


@dataclass
class Admission:
    settings: Settings
    tasks: tuple[str, ...]
    fingerprint: str  # of the server's (compressed) base
    input_prompts: torch.Tensor  # P1, frozen: part of the model every node must hold
    sha: str  # its content hash
    timeout: float
    reports: dict[int, NodeReport] = field(default_factory=dict)  # node -> what it reported, for admitted nodes
    left_out: set[int] = field(default_factory=set)
    reasons: dict[int, str] = field(default_factory=dict)  # node -> why it was left out
    partitions: dict[int, int] = field(default_factory=dict)  # node -> partition id (admitted, with a partition)
    unanswered: dict[int, str] = field(default_factory=dict)  # node -> why it did not answer (asked again later)
    prompts_sent: int = 0  # nodes that were sent the input prompts

    @property
    def seen(self) -> set[int]:
        return set(self.reports) | self.left_out

    def config(self) -> ConfigRecord:
        """What a node needs to rebuild the model: the run's tasks (expert order) and P1's hash."""
        return protocol.run_config(self.tasks, self.sha)

    def examples(self) -> int:
        """Training samples the admitted nodes hold in all."""
        return sum(r.num_examples for r in self.reports.values())

    def _leave_out(self, node: int, why: str) -> None:
        self.left_out.add(node)
        self.reasons[node] = why
        self.unanswered.pop(node, None)
        log(WARNING, "node %d is left out: %s", node, why)

    def _not_now(self, node: int, why: str) -> None:
        self.unanswered[node] = why
        log(WARNING, "node %d did not answer (%s); it is asked again when it is next connected", node, why)

    def admit(self, grid: Grid, nodes: list[int]) -> list[int]:
        """Query `nodes`, send P1 to those that lack it; the nodes admitted now."""
        asks = protocol.queries(nodes, self.config())
        found: dict[int, NodeReport] = {}
        for reply in list(grid.send_and_receive(asks, timeout=self.timeout)):
            node = answering_node(reply, asks)
            if reply.has_error() and reply.error.code in UNREACHABLE:
                self._not_now(node, reply.error.reason)
                continue
            if reply.has_error():
                self._leave_out(node, f"it could not load its data or base: {reply.error.reason}")
                continue
            report = protocol.parse_report(reply.content)
            if report.base_fingerprint != self.fingerprint:
                self._leave_out(node, f"its base has fingerprint {report.base_fingerprint}, the server's {self.fingerprint}; "
                                      + provisioning_hint(self.settings))
                continue
            found[node] = report
        for node in set(nodes) - set(found) - self.left_out - set(self.unanswered):
            self._not_now(node, f"no reply within {self.timeout:.0f} s (round-timeout)")
        self._send_input_prompts(grid, [n for n, r in found.items() if not r.has_input_prompts], found)
        for node, report in found.items():
            self.unanswered.pop(node, None)
            self.reports[node] = report
            if report.partition_id >= 0:
                self.partitions[node] = report.partition_id
        return sorted(found)

    def readmit_if_lacking_prompts(self, node: int, reason: str) -> None:
        """A node whose error says it lacks the input prompts (its cache was pruned or damaged since it
        was admitted) is admitted again, and so sent them, before it is next sampled."""
        if LACKS_INPUT_PROMPTS in reason and self.reports.pop(node, None) is not None:
            log(WARNING, "node %d lacks the input prompts it was sent; it is admitted again before it is next sampled", node)

    def _send_input_prompts(self, grid: Grid, nodes: list[int], found: dict[int, NodeReport]) -> None:
        if not nodes:
            return
        arrays = ArrayRecord({INPUT_PROMPTS: self.input_prompts.detach().float().cpu().contiguous()})
        messages = protocol.start_state_messages(nodes, arrays, self.sha)
        log(INFO, "sending the frozen input prompts (%d bytes) to %d nodes that lack them", arrays.count_bytes(), len(nodes))
        stored = set()
        for reply in list(grid.send_and_receive(messages, timeout=self.timeout)):
            node = answering_node(reply, messages)
            if reply.has_error():
                found.pop(node, None)
                if reply.error.code in UNREACHABLE:
                    self._not_now(node, reply.error.reason)
                else:
                    self._leave_out(node, f"it could not store the input prompts: {reply.error.reason}")
            else:
                stored.add(node)
        for node in set(nodes) - stored - self.left_out - set(self.unanswered):
            found.pop(node, None)
            self._not_now(node, f"it did not confirm storing the input prompts within {self.timeout:.0f} s")
        self.prompts_sent += len(stored)

    def names(self) -> dict[int, str]:
        """How results name a node: its partition, or `node-ID` for a node with its own file and no partition-id."""
        return {n: str(r.partition_id) if r.partition_id >= 0 else f"node-{n}" for n, r in self.reports.items()}

    def info(self) -> dict:
        """For results.json: what each admitted node trains on, holds out, and brought unknown; who was left out."""
        names = self.names()
        info = {
            "clients": {names[n]: list(r.task_counts) for n, r in self.reports.items()},
            "clients_heldout": {names[n]: r.num_heldout for n, r in self.reports.items()},
            "left_out": {str(n): why for n, why in sorted(self.reasons.items())},
            "unanswered": {str(n): why for n, why in sorted(self.unanswered.items())},
            "input_prompts_sent": self.prompts_sent,
        }
        unknown = {names[n]: r.unknown_tasks for n, r in self.reports.items() if r.unknown_tasks}
        if unknown:
            info["unknown_tasks"] = unknown
        return info

    def unknown_task_counts(self) -> Counter:
        counts: Counter = Counter()
        for report in self.reports.values():
            counts.update(report.unknown_tasks)
        return counts
