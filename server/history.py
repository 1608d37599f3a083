"""The record of a federated run: one row per round in results.json, figures beside it.

Written atomically after every round together with the checkpoint, so that a run killed at
any point can resume from its last finished round with its history intact.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mops_core import atomic, checkpoint, report
from mops_core.config import RESUMABLE, FederatedConfig, Settings, recorded
from mops_core.evaluate import EvalResult, gate_collapse
from mops_core.metrics import GenerationResult

from . import protocol
from .strategy import RoundLog

if TYPE_CHECKING:
    from mops_core.model import MoPsModel

    from .admission import Admission


class ResumeError(RuntimeError):
    """The run directory cannot be resumed with these settings."""


@dataclass(frozen=True)
class ResumePoint:
    """Where a run (re)starts: the rounds it has trained and saved, and whether the evaluation of that point
    is already on record (so that Flower's evaluation of its starting state is not recorded twice)."""

    round: int
    evaluated: bool


FRESH = ResumePoint(0, evaluated=False)  # nothing on record: round 0 is evaluated, training starts from the start state


@dataclass
class History:
    out_dir: Path
    settings: Settings
    rounds: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @property
    def path(self) -> Path:
        return self.out_dir / "results.json"

    @property
    def last_round(self) -> int:
        return self.rounds[-1]["round"] if self.rounds else -1

    @classmethod
    def open(cls, out_dir: Path, settings: Settings) -> History:
        """A fresh history, or the one on disk when the settings ask to resume."""
        history = cls(out_dir, settings)
        if not settings.federated.resume:
            return history
        if not history.path.exists():
            return history  # nothing to resume yet: the same command starts the run
        saved = json.loads(history.path.read_text())
        before = recorded(saved.get("settings", {}))  # a run from before a setting existed ran at its old value
        changed = sorted(k for k, v in settings.to_flat().items() if k not in RESUMABLE and before.get(k) != v)
        if changed:
            raise ResumeError(f"cannot resume {out_dir}: settings changed since it ran: {', '.join(changed)}")
        history.rounds = saved.get("rounds", [])
        history.info = saved.get("info", {})
        return history

    def resume_point(self) -> ResumePoint:
        """Fresh (nothing recorded), started (the start evaluated, no round saved), or after round N (its
        checkpoint, written before results.json, says N); rows recorded after that point are forgotten."""
        if not self.rounds:
            return FRESH
        saved = self.out_dir / "checkpoint"
        done = 0
        if self.last_round > 0 and (saved / checkpoint.CONFIG_FILE).exists():
            done = int(checkpoint.read(saved).config.get("round", 0))
        self.rewind(done)
        return ResumePoint(done, evaluated=True)

    def rewind(self, last_round: int) -> None:
        """Forget rows after `last_round` (results.json may be a round ahead of a checkpoint or behind it).

        The clock goes on from the kept rows' time, so a resumed run's wall_seconds count the
        rounds run before it too (the time it lay stopped does not count).
        """
        self.rounds = [r for r in self.rounds if r["round"] <= last_round]
        if self.rounds:
            self.started = time.perf_counter() - self.rounds[-1].get("wall_seconds", 0.0)

    def note_start_state(self, key: str, gate_train_accuracy: float | None) -> None:
        """The start state computed for this run (not found in the cache): its key and the gate's pretraining accuracy."""
        self.info["start_state"] = {"key": key, "gate_train_accuracy": gate_train_accuracy}

    def note_model(self, model: MoPsModel, tasks: Sequence[str], fingerprint: str) -> None:
        """What the run tunes: its parameters, what travels, the tasks, the base."""
        self.info.update(
            trainable_parameters=sum(p.numel() for p in model.trainable_parameters()),
            message_parameters=sum(t.numel() for t in model.federated_state_dict().values()),
            tasks=list(tasks),
            base_fingerprint=fingerprint,
            base_parameters=sum(p.numel() for p in model.base.parameters()),
        )

    def note_nodes(self, admission: Admission) -> None:
        """What each admitted node trains on and holds out, and who was left out (again as nodes join)."""
        self.info.update(admission.info())

    def note_privacy(self, fed: FederatedConfig, sampled: int) -> None:
        """The DP parameters, where the run clips (dp-clip > 0)."""
        if fed.dp_clip > 0:
            self.info["privacy"] = {"clipping": fed.dp_clipping, "clip": fed.dp_clip, "noise_multiplier": fed.dp_noise,
                                    "clients_per_round": sampled, "noise_std": fed.dp_noise * fed.dp_clip / sampled}

    def note_machine(self, first_round: int, about: dict) -> None:
        """What the rounds from `first_round` on compute on (CPU, bfloat16 units, GPU, dtype, torch), when it
        changes: a run resumed elsewhere mixes machines, and bfloat16 rounds differently on each."""
        machines = self.info.setdefault("machines", [])
        machines[:] = [m for m in machines if m["from_round"] < first_round]  # rounds being run again
        if not machines or {k: v for k, v in machines[-1].items() if k != "from_round"} != about:
            machines.append({"from_round": first_round, **about})

    def add_round(self, number: int, result: EvalResult, wire: RoundLog | None, eval_seconds: float,
                  generation: GenerationResult | None = None) -> dict:
        row: dict[str, Any] = {
            "round": number,
            "perplexity": result.perplexity,
            "loss": result.loss,
            "per_task": {t: s.perplexity for t, s in result.per_task.items()},
            "task_gate_entropy": {t: s.gate_entropy for t, s in result.per_task.items()},
            "task_routing": {t: s.routing_accuracy for t, s in result.per_task.items()},
            "gate_entropy": result.gate_entropy,
            "routing_accuracy": result.routing_accuracy,
            "gate_matrix": result.gate_matrix,
            **(gate_collapse(result.gate_matrix) or {}),
            "generation": generation.to_dict() if generation else None,
            "eval_seconds": eval_seconds,
            "wall_seconds": time.perf_counter() - self.started,
        }
        if wire is not None:
            row.update({k: v for k, v in asdict(wire).items() if k not in ("round", "started", "client_metrics")})
            row["train_loss"] = wire.client_metrics.get(protocol.TRAIN_LOSS)
            row["client_gate_share"] = wire.client_metrics.get(protocol.GATE)
        self.rounds = [r for r in self.rounds if r["round"] < number] + [row]
        return row

    def save(self) -> None:
        atomic.write_json(self.path, {"settings": self.settings.to_flat(), "info": self.info, "rounds": self.rounds})

    def plot(self) -> Path:
        return report.plot_curve(
            {self.settings.mops.method: [r["perplexity"] for r in self.rounds]},
            self.out_dir / "perplexity.png",
            x=[r["round"] for r in self.rounds],
            xlabel="round", ylabel="test perplexity", title=f"federated {self.settings.mops.method} on {self.settings.data.dataset}",
        )


def round_scalars(row: dict) -> dict[str, float | None]:
    """A round's row as tracker scalars, grouped as TensorBoard shows them: the test split, the clients'
    own data, training, the gate, the updates, the wire, time and the replies."""
    client = row.get("client_eval") or {}
    generation = row.get("generation") or {}
    agreement = row.get("agreement") or {}
    values: dict[str, float | None] = {
        "test/perplexity": row.get("perplexity"), "test/loss": row.get("loss"),
        **{f"test/perplexity/{task}": value for task, value in (row.get("per_task") or {}).items()},
        "clients/perplexity": client.get("perplexity"),
        **{f"clients/{q}": client.get(q) for q in ("p10", "p50", "p90")},
        **{f"clients/adapted/{q}": (client.get("adapted") or {}).get(q) for q in ("perplexity", "p10", "p50", "p90")},
        "train/loss": row.get("train_loss"),
        "gate/entropy": row.get("gate_entropy"), "gate/routing_accuracy": row.get("routing_accuracy"),
        **{f"gate/expert_share/{e}": share for e, share in enumerate(row.get("expert_share") or [])},
        "updates/cosine": agreement.get("cosine"), "updates/norm_ratio": agreement.get("norm_ratio"),
        "bytes/down": row.get("bytes_down"), "bytes/up": row.get("bytes_up"),
        "seconds/round": row.get("seconds"), "seconds/clients_training": row.get("train_seconds"),
        "seconds/evaluation": row.get("eval_seconds"), "seconds/clients_evaluation": row.get("client_eval_seconds"),
        "seconds/generation": row.get("generation_seconds"), "seconds/wall": row.get("wall_seconds"),
        "text/rouge_l": generation.get("rouge_l"), "text/exact_match": generation.get("exact_match"),
    }
    if "sampled" in row:  # a training round (round 0 only evaluates the start)
        values.update({"replies/sampled": row["sampled"], "replies/received": row["accepted"],
                       "replies/dropped": len(row["dropped"]), "replies/failed": row["failed"]})
    if row.get("replies"):  # what the round stopped waiting for (server/rounds.py)
        values.update({"replies/gone": len(row["replies"]["gone"]), "replies/late": len(row["replies"]["late"]),
                       "seconds/waiting": row["replies"]["seconds"]})
    return values


def replies_dropped(replies: dict | None) -> str:
    """'node 3 gone, node 7 late' for a round's reply account (server/rounds.py); '' when nothing was dropped."""
    if not replies:
        return ""
    return ", ".join(f"node {node} {why}" for why in ("gone", "late", "stale") for node in replies.get(why, []))


def progress_line(row: dict) -> str:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    parts = [f"round {row['round']:>3}", f"ppl {num('perplexity', '.3f')}", f"train loss {num('train_loss', '.3f')}"]
    client = row.get("client_eval")
    if client:  # federated evaluation: token-weighted over the clients, and its spread over them
        parts.append(f"clients' ppl {client['perplexity']:.3f} (p10-p90 {client['p10']:.2f}-{client['p90']:.2f}, {client['clients']} clients)")
        if adapted := client.get("adapted"):  # after each client adapted a copy on its own data
            parts.append(f"adapted {adapted['perplexity']:.3f} (p10-p90 {adapted['p10']:.2f}-{adapted['p90']:.2f})")
    if row.get("generation"):
        parts.append(f"ROUGE-L {row['generation']['rouge_l']:.1f} EM {row['generation']['exact_match']:.1f}")
    if row.get("gate_entropy") is not None:
        parts.append(f"gate entropy {num('gate_entropy', '.2f')}")
    if row.get("task_entropy"):  # gate-collapse diagnostics: entropy of each task's mean gate, each expert's share
        parts.append("mean-gate entropy per task " + " ".join("-" if v is None else f"{v:.2f}" for v in row["task_entropy"]))
        parts.append("expert shares " + " ".join(f"{v:.2f}" for v in row["expert_share"]))
    if "sampled" in row:
        parts += [
            f"clients {row['accepted']}/{row['sampled']}" + (f" ({len(row['dropped'])} dropped, {row['failed']} failed)" if row["dropped"] or row["failed"] else ""),
            f"sent {row['bytes_down'] / 1e6:.2f} MB, received {row['bytes_up'] / 1e6:.2f} MB",
            f"round {num('seconds', '.1f')} s (clients' training {num('train_seconds', '.1f')} s summed)",
        ]
    for what, key in (("training", "replies"), ("evaluation", "eval_replies")):
        if dropped := replies_dropped(row.get(key)):  # only when a round stopped waiting for someone
            parts.append(f"{what} ended ({row[key]['ended']}) after {row[key]['seconds']:.0f} s: {dropped}")
    agreement = row.get("agreement")
    if agreement and agreement["cosine"] is not None:  # how much the clients' prompt updates pulled together
        parts.append(f"updates' cosine {agreement['cosine']:.3f}, norm ratio {agreement['norm_ratio']:.3f}")
    return " | ".join(parts)
