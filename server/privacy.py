"""Central differential privacy with Flower's fixed-clipping wrappers around MoPsFedAvg.

Flower's wrappers clip every reply (server-side: on receipt; client-side: the client clips and
the wrapper only adds noise) and add Gaussian noise of std z x C / m to the average, m the
clients sampled per round. Two things are ours:

- Replies are screened by MoPsFedAvg first (failed, malformed, NaN, beyond update-norm-bound):
  the wrappers would clip a reply of the wrong shape into an exception, and skip a whole round
  on one failed client; screened, a bad reply is dropped and the round goes on.
- The noise is calibrated to a uniform average of m clipped updates. Averaging by examples, or
  each expert by examples x gate, gives one client up to its weight's share of the average
  instead of 1/m: docs/deployment.md says what that means for the guarantee.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, DifferentialPrivacyServerSideFixedClipping
from flwr.serverapp.strategy.strategy import Strategy

from mops_core.config import FederatedConfig

from .strategy import MoPsFedAvg


class _Averaging:
    """MoPsFedAvg as a DP wrapper holds it: the wrapper clips replies that `MoPsFedAvg.screen` accepted and
    hands them back to be averaged (`MoPsFedAvg.average`), not screened again."""

    def __init__(self, strategy: MoPsFedAvg) -> None:
        self.strategy = strategy
        self.weighted_by_key = strategy.weighted_by_key

    def configure_train(self, *args):
        return self.strategy.configure_train(*args)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.average(server_round, list(replies))

    def configure_evaluate(self, *args):
        return self.strategy.configure_evaluate(*args)

    def aggregate_evaluate(self, *args):
        return self.strategy.aggregate_evaluate(*args)

    def summary(self) -> None:
        self.strategy.summary()


class _ScreenFirst:
    screening: MoPsFedAvg

    def __init__(self, strategy: MoPsFedAvg, **kwargs) -> None:
        super().__init__(_Averaging(strategy), **kwargs)  # type: ignore[call-arg]
        self.screening = strategy

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = self.screening.screen(server_round, replies)
        if not accepted:
            return self.screening.average(server_round, accepted)  # logs it and keeps the state
        return super().aggregate_train(server_round, accepted)  # type: ignore[misc]


class ServerSideDP(_ScreenFirst, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, after our checks."""


class ClientSideDP(_ScreenFirst, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping (the ClientApp clips with Flower's fixedclipping_mod), after our checks."""


def with_privacy(strategy: MoPsFedAvg, fed: FederatedConfig, sampled: int) -> Strategy:
    """`strategy` wrapped for DP as the settings say (unchanged when dp-clip is 0), the parameters logged."""
    if fed.dp_clip == 0:
        return strategy
    wrapper = ServerSideDP if fed.dp_clipping == "server" else ClientSideDP
    std = fed.dp_noise * fed.dp_clip / sampled
    log(INFO, "differential privacy: %s-side fixed clipping to L2 norm %g, noise multiplier %g, %d clients per round: "
        "Gaussian noise of std %.4g on every averaged coordinate", fed.dp_clipping, fed.dp_clip, fed.dp_noise, sampled, std)
    if strategy.gate_experts is not None:
        log(WARNING, "differential privacy with expert-aggregation=gate: an expert that few clients use is averaged over "
            "few, so the noise protects their updates less than z says (docs/deployment.md); expert-aggregation=examples "
            "weighs experts like the rest")
    return wrapper(strategy, noise_multiplier=fed.dp_noise, clipping_norm=fed.dp_clip, num_sampled_clients=sampled)
