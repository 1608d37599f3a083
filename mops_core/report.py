"""What a person reads or looks at: terminal tables and PNG figures."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

if TYPE_CHECKING:  # annotations only: the benchmark's tables and figures are drawn without torch
    from .evaluate import EvalResult, TaskScore

console = Console()


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def eval_table(result: EvalResult, title: str = "test split", before: EvalResult | None = None) -> Table:
    table = Table(title=title)
    table.add_column("task")
    table.add_column("samples", justify="right")
    table.add_column("tokens", justify="right")
    if before is not None:
        table.add_column("ppl before", justify="right")
    table.add_column("perplexity", justify="right")
    for task, score in result.per_task.items():
        row = [task, str(score.samples), str(score.tokens)]
        if before is not None:
            prior = before.per_task.get(task)
            row.append(_fmt(prior.perplexity if prior else None))
        row.append(_fmt(score.perplexity))
        table.add_row(*row)
    last = ["all", str(result.samples), str(result.tokens)]
    if before is not None:
        last.append(_fmt(before.perplexity))
    last.append(_fmt(result.perplexity))
    table.add_row(*last, style="bold")
    return table


def gate_matrix_table(tasks, matrix, entropy, accuracy, per_task: Mapping[str, TaskScore] | None = None) -> Table:
    """With `per_task` (an evaluation's), only its tasks are shown, each with its own entropy per
    input and routing accuracy: one task can route well while another drifts."""
    experts = len(matrix[0])
    table = Table(title="mean gate score per task (rows) and expert (columns)")
    table.add_column("task")
    for e in range(experts):
        table.add_column(f"E{e}", justify="right")
    if per_task is not None:
        table.add_column("entropy", justify="right")
        table.add_column("routed", justify="right")
    for task, row in zip(tasks, matrix):
        if per_task is None:
            table.add_row(task, *(f"{v:.2f}" for v in row))
        elif task in per_task:
            score = per_task[task]
            table.add_row(task, *(f"{v:.2f}" for v in row), _fmt(score.gate_entropy, 2), _fmt(score.routing_accuracy, 2))
    table.caption = f"mean entropy {_fmt(entropy)} nats (uniform {math.log(experts):.3f}); routing accuracy {_fmt(accuracy)}"
    return table


def generation_table(result, title: str = "greedy answers: ROUGE-L and exact match (%)") -> Table:
    """Per task and overall, from a `metrics.GenerationResult`."""
    table = Table(title=title)
    for name in ("task", "samples", "ROUGE-L", "exact match"):
        table.add_column(name, justify="left" if name == "task" else "right")
    for task, score in result.per_task.items():
        if score.samples:
            table.add_row(task, str(score.samples), _fmt(score.rouge_l, 1), _fmt(score.exact_match, 1))
    table.add_row("all", str(result.overall.samples), _fmt(result.overall.rouge_l, 1), _fmt(result.overall.exact_match, 1), style="bold")
    table.caption = f"at most {result.max_new_tokens} new tokens per answer"
    return table


def gate_table(result: EvalResult) -> Table | None:
    if result.gate_matrix is None:
        return None
    return gate_matrix_table(result.tasks, result.gate_matrix, result.gate_entropy, result.routing_accuracy, result.per_task)


def print_eval(result: EvalResult, title: str = "test split", before: EvalResult | None = None) -> None:
    console.print(eval_table(result, title, before))
    gates = gate_table(result)
    if gates is not None:
        console.print(gates)


def plot_gate_heatmap(result: EvalResult, path: str | Path, title: str = "Mean gate score per task") -> Path | None:
    """The paper's Fig. 4: which experts each task's test samples use."""
    if result.gate_matrix is None:
        return None
    return plot_gate_matrix(result.tasks, result.gate_matrix, path, title=title, present=result.per_task)


def plot_gate_matrix(tasks, matrix, path: str | Path, *, title: str = "Mean gate score per task", present=None) -> Path:
    rows = [(t, r) for t, r in zip(tasks, matrix) if present is None or t in present]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(rows[0][1]), 1.0 + 0.5 * len(rows)))
    image = ax.imshow([r for _, r in rows], cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(rows[0][1])), [f"E{e}" for e in range(len(rows[0][1]))])
    ax.set_yticks(range(len(rows)), [t for t, _ in rows])
    for i, (_, row) in enumerate(rows):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.5 * max(row) else "k", fontsize=8)
    ax.set_xlabel("expert")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_curve(
    series: dict[str, Sequence[float]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    smooth: int = 1,
    x: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    integer_x: bool = True,
    reference: float | None = None,
) -> Path:
    """One line per named series (losses per step, perplexity per round, ...); x defaults to 1, 2, ...

    `x` is shared by all series, or given per series name; `reference` draws a level to read the
    lines against (0 for a difference between methods).
    """
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series.items():
        values = list(values)
        own_x = x.get(name) if isinstance(x, Mapping) else x
        xs = list(own_x) if own_x is not None else list(range(1, len(values) + 1))
        if smooth > 1 and len(values) >= smooth:
            values = [sum(values[i : i + smooth]) / smooth for i in range(len(values) - smooth + 1)]
            xs = xs[smooth - 1 :]
        ax.plot(xs, values, label=name, marker="o" if len(values) <= 30 else None)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and rounds are whole numbers
    ax.grid(alpha=0.3)
    if len(series) > 6:  # many lines: the legend beside the plot, not over it
        fig.set_size_inches(10, 4)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    elif len(series) > 1:
        ax.legend()
    return _save(fig, path)


def plot_seed_panels(
    panels: Mapping[str, Mapping[str, Mapping[int, tuple[Sequence[float], Sequence[float]]]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    reference: float | None = None,
) -> Path:
    """One panel per name ({panel: {line: {seed: (x, y)}}}): every seed a thin line, their mean bold, one colour a line.

    The mean is taken where all of a line's seeds have a point, so a seed still running does not bend it.
    """
    # one panel alone still gets the width of its figure's title, which would otherwise run over the y label
    fig, axes = plt.subplots(1, len(panels), figsize=(max(7.5, 5.5 * len(panels)), 4), squeeze=False, sharex=True)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for colour, (line, seeds) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], lines.items()):
            for xs, ys in seeds.values():
                ax.plot(xs, ys, color=colour, linewidth=0.8, alpha=0.45)
            shared = sorted(set.intersection(*(set(xs) for xs, _ in seeds.values())))
            by_seed = [dict(zip(xs, ys)) for xs, ys in seeds.values()]
            mean = [sum(points[x] for points in by_seed) / len(by_seed) for x in shared]
            ax.plot(shared, mean, color=colour, linewidth=2.2, label=f"{line} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        if reference is not None:
            ax.axhline(reference, color="black", linewidth=0.8)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title)
    return _save(fig, path)


def plot_points(
    series: Mapping[str, Sequence[tuple[float, float, float | None]]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
    reference: float | None = None,
) -> Path:
    """One line per named series of (x, mean, sd or None) points, the sd as error bars."""
    fig, ax = plt.subplots(figsize=(9.5 if len(series) > 1 else 6, 4.5))  # room for the legend beside the axes
    for name, points in series.items():
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        errors = [p[2] or 0.0 for p in points]
        ax.errorbar(xs, ys, yerr=errors if any(errors) else None, label=name, marker="o", capsize=3)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, never over them
    return _save(fig, path)


def plot_bars(
    groups: Mapping[str, Mapping[str, tuple[float, float | None]]], path: str | Path, *, ylabel: str, title: str,
    signed: bool = False, least_top: float | None = None,
) -> Path:
    """Grouped bars with error bars: {group: {series: (mean, sd or None)}}.

    `signed` values (gains) are drawn from a line at 0; otherwise the axis zooms onto the values.
    `least_top`: the axis reaches at least this high, so that a difference too small to matter on
    the metric's scale is not stretched over the whole figure.
    """
    names = list(dict.fromkeys(name for bars in groups.values() for name in bars))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2) + 2.5, 4))  # + the legend beside the axes
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        means = [bars.get(name, (math.nan, None))[0] for bars in groups.values()]
        sds = [bars.get(name, (math.nan, None))[1] for bars in groups.values()]
        spread = None if all(sd is None for sd in sds) else [sd or 0.0 for sd in sds]  # no caps where none was measured
        ax.bar(xs, means, width, yerr=spread, capsize=3, label=name)
    finite = [m for bars in groups.values() for m, _ in bars.values() if m is not None and math.isfinite(m)]
    if signed:
        ax.axhline(0.0, color="black", linewidth=0.8)
    if least_top is not None and ax.get_ylim()[1] < least_top:
        ax.set_ylim(top=least_top)
    elif finite:  # perplexities differ by little: show the differences, not the distance from 0
        low, high = min(finite), max(finite)
        pad = max(0.05 * (high - low), 0.01 * abs(high), 1e-3)  # all equal (ROUGE-L 0 everywhere): still a range
        ax.set_ylim(low - 3 * pad, high + 3 * pad)
    long_names = max(len(name) for name in groups) > 16 if groups else False  # task names: slant them
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8, rotation=25 if long_names else 0, ha="right" if long_names else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return _save(fig, path)


def plot_partitions(counts: dict[int | str, Sequence[int]], tasks: Sequence[str], path: str | Path) -> Path:
    """Stacked bars: how many samples of each task every client holds (the non-i.i.d. split).

    Clients are partition ids, then named nodes (nodes with their own data and no partition id)."""
    clients = sorted(counts, key=lambda c: (isinstance(c, str), c if isinstance(c, int) else 0, str(c)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.09 * len(clients) + 2) + 2.5, 4))  # + the legend beside the bars
    bottom = [0] * len(clients)
    colours = plt.get_cmap("tab10")
    for t, task in enumerate(tasks):
        heights = [counts[c][t] if t < len(counts[c]) else 0 for c in clients]
        ax.bar(range(len(clients)), heights, bottom=bottom, width=0.9, label=task, color=colours(t % 10))
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("training samples")
    ax.set_title("Task mix per client")
    step = max(1, len(clients) // 20)
    ax.set_xticks(range(0, len(clients), step), [str(clients[i]) for i in range(0, len(clients), step)])
    ax.set_xlim(-0.6, len(clients) - 0.4)  # every bar whole, the last one too
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    return _save(fig, path)
