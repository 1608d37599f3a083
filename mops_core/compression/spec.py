"""The `compression` setting: "none", "int8", or METHOD:RATIO with RATIO a sparsity or N:M.

    sparsegpt:0.75   75% of each matrix's weights pruned, unstructured
    sparsegpt:2:4    2 of every 4 consecutive weights pruned (the paper's N:M: N pruned of M)
    wanda:0.5, magnitude:7:8, int8, none
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pattern:
    """What to prune: `sparsity` of the weights, or N of every M."""

    sparsity: float = 0.0
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    @property
    def ratio(self) -> float:
        return self.n / self.m if self.structured else self.sparsity

PRUNERS = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class CompressionSpec:
    method: str  # "none" | "int8" | one of PRUNERS
    pattern: Pattern | None = None

    @property
    def calibrated(self) -> bool:
        return self.method in ("wanda", "sparsegpt")


def parse(text: str) -> CompressionSpec:
    """Parse a spec; ValueError says what is wrong with it."""
    text = text.strip().lower()
    if text in ("none", "int8"):
        return CompressionSpec(text)
    method, _, ratio = text.partition(":")
    if method not in PRUNERS:
        raise ValueError(f"unknown method {method!r} in {text!r} (none, int8, {', '.join(p + ':RATIO' for p in PRUNERS)})")
    if not ratio:
        raise ValueError(f"{text!r} needs a ratio: {method}:0.75 or {method}:2:4")
    if ":" in ratio:
        n_text, _, m_text = ratio.partition(":")
        try:
            n, m = int(n_text), int(m_text)
        except ValueError:
            raise ValueError(f"N:M in {text!r} must be two integers") from None
        if not 0 < n < m:
            raise ValueError(f"N:M in {text!r} needs 0 < N < M (N of every M weights are pruned)")
        return CompressionSpec(method, Pattern(n=n, m=m))
    try:
        sparsity = float(ratio)
    except ValueError:
        raise ValueError(f"ratio in {text!r} must be a number like 0.75 or N:M like 2:4") from None
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"sparsity in {text!r} must be between 0 and 1")
    return CompressionSpec(method, Pattern(sparsity=sparsity))
