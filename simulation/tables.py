"""The benchmark's outputs from its records alone: the paper's tables (terminal and Markdown),
its figures (PNG), and a flat CSV. Everything here reads `results.json` records, so the tables
always hold the numbers of the results file and can be redrawn without rerunning anything.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from rich.table import Table

from mops_core import atomic, report
from mops_core.config import BASE_SETTINGS
from mops_core.labels import expert_targets


CSV_COLUMNS = (
    "id", "kind", "method", "study", "dataset", "compression", "model", "seed", "inject-layer", "experts",
    "prompts-per-expert", "lr", "steps", "num-server-rounds", "local-steps", "alpha", "perplexity_start", "perplexity",
    "client_perplexity", "client_adapted_perplexity", "rouge_l", "exact_match",
    "trainable_parameters", "bytes_communicated", "gate_entropy", "routing_accuracy", "wall_seconds", "machine", "commit", "base_fingerprint", "dir",
)
METHOD_NAMES = {"prompt": "prompt tuning", "mops": "MoPs", "lora": "LoRA", "ia3": "IA3", "fedprompt": "FedPrompt"}


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


class ResultTable:
    """A titled table, rendered for the terminal (rich) and for Markdown alike."""

    def __init__(self, title: str, headers: Sequence[str], rows: Iterable[Sequence[str]], caption: str = ""):
        self.title, self.headers, self.rows, self.caption = title, list(headers), [list(r) for r in rows], caption

    def rich(self) -> Table:
        table = Table(title=self.title, caption=self.caption or None)
        for i, header in enumerate(self.headers):
            table.add_column(header, justify="left" if i < 2 else "right")
        for row in self.rows:
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |", "|" + "---|" * len(self.headers)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.caption:
            lines += ["", self.caption]
        return "\n".join(lines) + "\n"


Key = tuple[str, str, str]  # dataset, compression, variant


def _main(records: Sequence[dict], kind: str) -> dict[Key, dict[str, list[dict]]]:
    """(dataset, compression, variant) -> method -> records (one per seed), for the table cells of one kind."""
    table: dict[Key, dict[str, list[dict]]] = {}
    for r in records:
        if r["kind"] == kind and r["study"] == "main":
            for variant in r.get("variants") or ["default"]:
                table.setdefault((r["dataset"], r["compression"], variant), {}).setdefault(r["method"], []).append(r)
    return table


def _mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _ppl(runs: Sequence[dict] | None, key: str = "perplexity") -> tuple[float | None, float | None]:
    values = [r[key] for r in runs or [] if r.get(key) is not None]
    if not values:
        return None, None
    return _mean_sd(values)


def _rouge(runs: Sequence[dict] | None) -> str:
    """Mean ROUGE-L (± sd over seeds) of greedy answers, '-' for runs that scored none."""
    mean, sd = _ppl(runs, "rouge_l")
    return "-" if mean is None else f"{mean:.1f}" + ("" if sd is None else f" ± {sd:.1f}")


def _with_sd(mean: float | None, sd: float | None) -> str:
    return _num(mean) + ("" if sd is None else f" ± {sd:.3f}")


def _labels(table: dict[Key, dict]) -> tuple[list[str], Callable[[Key], list[str]]]:
    """Row labels: data and compression, and the variant when the grid has more than one."""
    variants = len({key[2] for key in table}) > 1
    headers = ["data", "compression"] + (["variant"] if variants else [])
    return headers, (lambda key: list(key) if variants else list(key[:2]))


def comparison(records: Sequence[dict], kind: str, baseline: str, title: str) -> ResultTable | None:
    """Tables 2 and 3: baseline -> MoPs, with the gain and the gain in % (positive = MoPs better).

    With several seeds each perplexity is a mean ± standard deviation, and MoPs counts as
    better only when its gain exceeds the larger of the two spreads.
    """
    table = _main(records, kind)
    label_headers, label = _labels(table)
    rows = []
    for key, methods in table.items():
        base, mops = methods.get(baseline), methods.get("mops")
        if not base and not mops:
            continue
        (b, b_sd), (m, m_sd) = _ppl(base), _ppl(mops)
        gain = b - m if b is not None and m is not None else None
        spread = max(b_sd or 0.0, m_sd or 0.0)
        if gain is None:
            verdict = "-"
        elif abs(gain) <= spread:
            verdict = "within spread"
        else:
            verdict = "MoPs" if gain > 0 else METHOD_NAMES[baseline]
        seeds = max(len(base or []), len(mops or []))
        rows.append([
            *label(key), str(seeds), _num(_ppl(base, "perplexity_start")[0]), _with_sd(b, b_sd), _with_sd(m, m_sd), _num(gain),
            "-" if gain is None else f"{100 * gain / b:+.1f}%", verdict, _rouge(base), _rouge(mops),
        ])
    if not rows:
        return None
    headers = [*label_headers, "seeds", "start", METHOD_NAMES[baseline], "MoPs", "gain", "gain %", "better",
               f"ROUGE-L {METHOD_NAMES[baseline]}", "ROUGE-L MoPs"]
    return ResultTable(title, headers, rows, "test perplexity (lower is better); gain = baseline - MoPs; "
                "ROUGE-L (%, higher is better) of greedy answers to the first test samples of every task")


def peft_comparison(records: Sequence[dict], title: str) -> ResultTable | None:
    """Table 4: every centralized method at equal steps, with trainable-parameter counts."""
    table = _main(records, "centralized")
    methods = [m for m in ("prompt", "mops", "lora", "ia3") if any(m in row for row in table.values())]
    if not table or not {"lora", "ia3"} & set(methods):
        return None
    label_headers, label = _labels(table)
    params = {}
    for row in table.values():
        for method, runs in row.items():
            params.setdefault(method, runs[0].get("trainable_parameters"))
    headers = label_headers + [f"{METHOD_NAMES[m]} ({params[m]:,} params)" if params.get(m) else METHOD_NAMES[m] for m in methods]
    rows = []
    for key, row in table.items():
        values = {m: _ppl(row[m]) for m in methods if m in row}
        best = min(values, key=lambda m: values[m][0]) if values else None
        cells = [(_with_sd(*values[m]) + (" *" if m == best else "")) if m in values else "-" for m in methods]
        rows.append([*label(key), *cells, *(_rouge(row.get(m)) for m in methods)])
    headers += [f"ROUGE-L {METHOD_NAMES[m]}" for m in methods]
    steps = sorted({r["steps"] for row in table.values() for runs in row.values() for r in runs})
    return ResultTable(title, headers, rows, f"test perplexity after {', '.join(map(str, steps))} steps; * best in the row; "
                "ROUGE-L (%) of greedy answers")


def gate_diagnostics(records: Sequence[dict]) -> ResultTable | None:
    """Gate collapse at the end of every MoPs cell: per-sample entropy, each task's mean-gate entropy, expert shares."""
    rows = []
    for r in records:
        if r["method"] != "mops" or not r.get("gate_matrix"):
            continue
        task_entropy = [e for e in r.get("task_entropy") or [] if e is not None]
        where = " ".join([r["dataset"], r["compression"], *[v for v in r.get("variants") or [] if v != "default"]])
        rows.append([
            r["kind"], f"{where} seed {r['settings']['seed']}" + ("" if r["study"] == "main" else f" ({r['study']} {_study_value(r)})"),
            _num(r.get("gate_entropy"), 2), _num(sum(task_entropy) / len(task_entropy) if task_entropy else None, 2),
            " ".join(f"{s:.2f}" for s in r.get("expert_share") or []),
            f"{_num(r.get('routing_accuracy_start'), 2)} -> {_num(r.get('routing_accuracy'), 2)}",
        ])
    if not rows:
        return None
    experts = max(len(r.get("expert_share") or []) for r in records if r["method"] == "mops") or 1
    headers = ["kind", "cell", "entropy/sample", "entropy of task mean", "expert shares", "routing acc. (start -> end)"]
    return ResultTable("Gate collapse diagnostics (MoPs, test split)", headers, rows, f"nats; uniform = {math.log(experts):.2f}")


def _task_mean(runs: Sequence[dict], field: str, task: str) -> float | None:
    values = [r[field][task] for r in runs if (r.get(field) or {}).get(task) is not None]
    return _mean_sd(values)[0] if values else None


def _own_expert_share(runs: Sequence[dict], task: str) -> float | None:
    """The mean gate score a task's test samples give the expert pretrained for it."""
    shares = []
    for r in runs:
        if r.get("gate_matrix") and task in r["tasks"]:
            i = r["tasks"].index(task)
            shares.append(r["gate_matrix"][i][expert_targets(i, len(r["gate_matrix"][i]))])
    return _mean_sd(shares)[0] if shares else None


def per_task_gains(records: Sequence[dict], kind: str, baseline: str) -> dict[Key, dict[str, dict[str, float | None]]]:
    """(dataset, compression, variant) -> task -> baseline and MoPs perplexity (means over seeds),
    MoPs' gain in %, and what its gate did with the task's test samples."""
    gains: dict[Key, dict[str, dict[str, float | None]]] = {}
    for key, methods in _main(records, kind).items():
        base, mops = methods.get(baseline) or [], methods.get("mops") or []
        for task in dict.fromkeys(t for r in mops for t in r.get("per_task") or {}):
            b, m = _task_mean(base, "per_task", task), _task_mean(mops, "per_task", task)
            gains.setdefault(key, {})[task] = {
                "baseline": b, "mops": m, "gain_pct": 100 * (b - m) / b if b and m is not None else None,
                "entropy": _task_mean(mops, "task_gate_entropy", task), "own_expert": _own_expert_share(mops, task),
                "routing": _task_mean(mops, "task_routing", task),
            }
    return gains


def per_task_comparison(records: Sequence[dict], kind: str, baseline: str, title: str) -> ResultTable | None:
    """Where the mixture wins and loses: each task's perplexity, and whether the gate sent it to its expert."""
    gains = per_task_gains(records, kind, baseline)
    if not gains:
        return None
    label_headers, label = _labels(gains)
    rows = [
        [*label(key), task, _num(g["baseline"]), _num(g["mops"]),
         "-" if g["gain_pct"] is None else f"{g['gain_pct']:+.1f}%",
         _num(g["entropy"], 2), _num(g["own_expert"], 2), _num(g["routing"], 2)]
        for key, tasks in gains.items() for task, g in tasks.items()
    ]
    headers = [*label_headers, "task", METHOD_NAMES[baseline], "MoPs", "gain %", "entropy/sample", "own expert", "routing acc."]
    return ResultTable(title, headers, rows, "test perplexity, means over seeds; gain > 0 = MoPs lower; own expert = the task's mean "
                                      "gate score on the expert pretrained for it; entropy in nats")


def leads_during_training(records: Sequence[dict], kind: str, baseline: str) -> dict[Key, dict]:
    """(dataset, compression, variant) -> MoPs' lead over the baseline at each point of training, paired by seed.

    Whether the mixture is closing on the baseline or falling behind says more about a longer run
    than where a short one ends. Centrally both methods of a seed see the same batches in the same
    order, so the per-step difference in training loss (nats) is free of the batch-to-batch noise
    that swamps either curve alone; federated, each round's test perplexity is compared (%).
    Positive = MoPs lower. Returns {"x": points, "unit": ..., "seeds": {seed: leads}}.
    """
    if kind == "centralized":
        unit, difference = "training loss, nats", lambda b, m: b - m
    else:
        unit, difference = "test perplexity, %", lambda b, m: 100 * (b - m) / b
    leads: dict[Key, dict] = {}
    for key, methods in _main(records, kind).items():
        base = {r["settings"]["seed"]: r["curve"] for r in methods.get(baseline) or []}
        for run in methods.get("mops") or []:
            seed, mops = run["settings"]["seed"], run["curve"]
            if seed not in base or base[seed]["x"] != mops["x"]:
                continue  # unpaired, or cut at another length: no like-for-like difference
            entry = leads.setdefault(key, {"x": list(mops["x"]), "unit": unit, "seeds": {}})
            if entry["x"] == list(mops["x"]):  # seeds of one row are averaged point by point
                entry["seeds"][seed] = [difference(b, m) for b, m in zip(base[seed]["y"], mops["y"])]
    return leads


def _stretches(count: int, parts: int) -> list[range]:
    """`count` points cut into at most `parts` consecutive stretches of near-equal length."""
    parts = max(1, min(parts, count))
    edges = [round(i * count / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(edges, edges[1:])]


def lead_table(records: Sequence[dict], kind: str, baseline: str, title: str, parts: int = 5) -> ResultTable | None:
    """MoPs' lead over the baseline through training: centrally the mean per-step lead in each
    fifth of the steps, federated the lead after evenly spaced rounds (each a full test)."""
    leads = leads_during_training(records, kind, baseline)
    if not leads:
        return None
    label_headers, label = _labels(leads)
    entries = []  # (row label, seeds, where each part falls, its lead)
    for key, lead in leads.items():
        xs, cells = lead["x"], []
        stretches = _stretches(len(xs), parts)
        for stretch in stretches:
            # federated: the round that ends the stretch; centralized: every step in it
            points = stretch if kind == "centralized" else [stretch[-1]]
            per_seed = [sum(s[i] for i in points) / len(points) for s in lead["seeds"].values()]
            cells.append(_with_sd(*_mean_sd(per_seed)))
        spans = [f"steps {xs[s[0]]}-{xs[s[-1]]}" if kind == "centralized" else f"round {xs[s[-1]]}" for s in stretches]
        entries.append((label(key), str(len(lead["seeds"])), spans, cells))
    if all(spans == entries[0][2] for _, _, spans, _ in entries):
        headers = [*label_headers, "seeds", *entries[0][2]]
        rows = [[*labels, seeds, *cells] for labels, seeds, _, cells in entries]
    else:  # runs of different lengths in one grid: each row says where its parts fall
        width = max(len(cells) for *_, cells in entries)
        headers = [*label_headers, "seeds", "parts", *[f"part {i + 1}" for i in range(width)]]
        rows = [[*labels, seeds, ", ".join(spans), *cells, *["-"] * (width - len(cells))] for labels, seeds, spans, cells in entries]
    unit = next(iter(leads.values()))["unit"]
    return ResultTable(title, headers, rows, f"MoPs' lead over {METHOD_NAMES[baseline]} ({unit}), mean ± sd over seeds, "
                                      "paired by seed; positive = MoPs lower")


# ---------------------------------------------------------------------- heterogeneity: gain and agreement against alpha

HeteroKey = tuple[str, str, int, float]  # dataset, compression, local steps, alpha


def heterogeneity_pairs(records: Sequence[dict]) -> dict[HeteroKey, dict[int, dict[str, dict]]]:
    """(dataset, compression, local steps, alpha) -> seed -> method -> record, for federated main cells, where a
    dataset's cells span more than one alpha (a heterogeneity sweep); {} otherwise."""
    runs = [r for r in records if r["kind"] == "federated" and r["study"] == "main" and _arm(r) != "mops-local"]
    swept = {d for d in {r["dataset"] for r in runs} if len({r["settings"]["alpha"] for r in runs if r["dataset"] == d}) > 1}
    pairs: dict[HeteroKey, dict[int, dict[str, dict]]] = {}
    for r in runs:
        if r["dataset"] in swept:
            key = (r["dataset"], r["compression"], int(r["settings"]["local-steps"]), float(r["settings"]["alpha"]))
            pairs.setdefault(key, {}).setdefault(int(r["settings"]["seed"]), {})[r["method"]] = r
    return dict(sorted(pairs.items()))


def _paired(seeds: dict[int, dict[str, dict]], field: str, relative: bool, arm: str = "mops") -> tuple[float | None, float | None]:
    """MoPs' gain over FedPrompt in `field`, seed by seed, as mean and sd: (FedPrompt - MoPs) / FedPrompt in %
    for a perplexity (`relative`), MoPs - FedPrompt in points for ROUGE-L. `arm` names the MoPs run to pair."""
    gains = [g for g in (_gain(methods, field, relative, arm) for methods in seeds.values()) if g is not None]
    return _mean_sd(gains) if gains else (None, None)


def _gain(methods: dict[str, dict], field: str, relative: bool, arm: str = "mops") -> float | None:
    """One seed's gain (see `_paired`); None where either method lacks the field."""
    fed, mops = (methods.get(m, {}).get(field) for m in ("fedprompt", arm))
    if fed is None or mops is None:
        return None
    return 100 * (fed - mops) / fed if relative else mops - fed


def _both(seeds: dict[int, dict[str, dict]]) -> dict[int, dict[str, dict]]:
    """The seeds where FedPrompt and MoPs both finished."""
    return {seed: m for seed, m in seeds.items() if "fedprompt" in m and "mops" in m}


def _agreement(seeds: dict[int, dict[str, dict]], method: str, field: str) -> tuple[float | None, float | None]:
    values = [m[method]["agreement"][field] for m in seeds.values()
              if method in m and (m[method].get("agreement") or {}).get(field) is not None]
    return _mean_sd(values) if values else (None, None)


def _minutes(runs: Sequence[dict]) -> str:
    times = [r["wall_seconds"] / 60 for r in runs if r.get("wall_seconds")]
    return f"{sum(times) / len(times):.0f}" if times else "-"


def _pct(mean: float | None, sd: float | None, unit: str = "%") -> str:
    return "-" if mean is None else f"{mean:+.1f}{unit}" + ("" if sd is None else f" ± {sd:.1f}")


def heterogeneity_table(records: Sequence[dict]) -> ResultTable | None:
    pairs = heterogeneity_pairs(records)
    if not pairs:
        return None
    rows = []
    for (dataset, compression, steps, alpha), seeds in pairs.items():
        # Every comparison rests on the seeds where both methods finished: while a grid is under way, a seed with one
        # method alone would otherwise move that method's mean and agreement and not the other's.
        both = _both(seeds)
        fed, mops = ([m[method] for m in both.values()] for method in ("fedprompt", "mops"))
        cos_f, cos_m = _agreement(both, "fedprompt", "cosine"), _agreement(both, "mops", "cosine")
        ratio_f, ratio_m = _agreement(both, "fedprompt", "norm_ratio"), _agreement(both, "mops", "norm_ratio")
        alone = len(seeds) - len(both)
        rows.append([
            dataset, compression, str(steps), f"{alpha:g}", f"{len(both)}" + (f" (+{alone} unpaired)" if alone else ""),
            _with_sd(*_ppl(fed)), _with_sd(*_ppl(mops)),
            _pct(*_paired(seeds, "perplexity", True)), _pct(*_paired(seeds, "client_perplexity", True)),
            _pct(*_paired(seeds, "rouge_l", False), unit=""),
            f"{_num(cos_f[0])} / {_num(cos_m[0])}", f"{_num(ratio_f[0])} / {_num(ratio_m[0])}",
            " / ".join(_minutes([m[method] for m in seeds.values() if method in m]) for method in ("fedprompt", "mops")),
        ])
    headers = ["data", "compression", "local steps", "alpha", "seeds", "FedPrompt ppl", "MoPs ppl", "gain %", "clients' ppl gain %",
               "ROUGE-L gain", "updates' cosine F / M", "norm ratio F / M", "minutes per cell F / M"]
    return ResultTable("Heterogeneity: MoPs' gain over FedPrompt against alpha", headers, rows,
                "seeds where both methods finished (a seed with one alone is counted as unpaired and left out of every column "
                "but the minutes); gains paired seed by seed, mean ± sd over seeds (positive = MoPs better): test perplexity and the clients' "
                "own held-out perplexity in % of FedPrompt's, ROUGE-L in points; the clients' prompt-update agreement "
                "(mean over rounds; MoPs per expert by gate): pairwise cosine and the averaged update's norm over the mean "
                "client's, FedPrompt / MoPs; each cell's wall time, mean over seeds")


def heterogeneity_trend(records: Sequence[dict]) -> ResultTable | None:
    """Does MoPs' gain grow as the split grows more skewed? Seed by seed, the gain at the lowest alpha minus the gain at
    the highest, and the same for each method's update agreement: the seeds share their start state and test set, so
    the difference cancels what moves a whole seed up or down, which a comparison of means over seeds does not."""
    sweeps: dict[tuple[str, str, int], dict[float, dict[int, dict[str, dict]]]] = {}
    for (dataset, compression, steps, alpha), seeds in heterogeneity_pairs(records).items():
        sweeps.setdefault((dataset, compression, steps), {})[alpha] = _both(seeds)
    rows = []
    for (dataset, compression, steps), by_alpha in sweeps.items():
        high, low = max(by_alpha), min(by_alpha)
        seeds = sorted(set(by_alpha[high]) & set(by_alpha[low]))
        if high == low or not seeds:
            continue

        def change(value: Callable[[dict[str, dict]], float | None]) -> list[float]:
            """`value` of each seed at the lowest alpha minus at the highest, over the seeds that have it at both."""
            ends = [(value(by_alpha[low][s]), value(by_alpha[high][s])) for s in seeds]
            return [at_low - at_high for at_low, at_high in ends if at_low is not None and at_high is not None]

        def cosine(method: str) -> Callable[[dict[str, dict]], float | None]:
            return lambda methods: (methods[method].get("agreement") or {}).get("cosine")

        growth = change(lambda methods: _gain(methods, "perplexity", True))
        rows.append([
            dataset, compression, str(steps), f"{high:g} → {low:g}", str(len(seeds)),
            _pct(*_paired({s: by_alpha[high][s] for s in seeds}, "perplexity", True)),
            _pct(*_paired({s: by_alpha[low][s] for s in seeds}, "perplexity", True)),
            _pct(*_mean_sd(growth), unit=" pts"), f"{sum(g > 0 for g in growth)} of {len(growth)}",
            " / ".join("-" if not c else f"{_mean_sd(c)[0]:+.3f}" for c in (change(cosine("fedprompt")), change(cosine("mops")))),
        ])
    if not rows:
        return None
    headers = ["data", "compression", "local steps", "alpha", "seeds", "gain % at the highest alpha", "gain % at the lowest",
               "growth", "seeds where it grows", "cosine change F / M"]
    return ResultTable("Heterogeneity: does MoPs' gain grow with skew?", headers, rows,
                "seeds where both methods finished at both ends of the alpha sweep; growth = gain at the lowest alpha minus "
                "gain at the highest, seed by seed (percentage points; mean ± sd over seeds; positive = MoPs gains more where "
                "clients differ more); the change of each method's mean update cosine from the highest alpha to the lowest, "
                "mean over seeds (negative = the clients' updates agree less as their data grows apart)")


def heterogeneity_figures(records: Sequence[dict], folder: Path) -> list[Path]:
    """MoPs' gain over FedPrompt against alpha (perplexity, then ROUGE-L), and the clients' update agreement against alpha."""
    pairs = heterogeneity_pairs(records)
    if not pairs:
        return []
    gains: dict[str, list] = {}
    rouge: dict[str, list] = {}
    agreement: dict[str, list] = {}
    compressions = len({key[1] for key in pairs}) > 1
    for (dataset, compression, steps, alpha), seeds in pairs.items():
        line = f"{dataset}{f' {compression}' if compressions else ''}, {steps} local steps"
        for label, field, relative in (("test", "perplexity", True), ("clients'", "client_perplexity", True)):
            mean, sd = _paired(seeds, field, relative)
            if mean is not None:
                gains.setdefault(f"{line}, {label} ppl", []).append((alpha, mean, sd))
        mean, sd = _paired(seeds, "rouge_l", False)
        if mean is not None:
            rouge.setdefault(line, []).append((alpha, mean, sd))
        for method in ("fedprompt", "mops"):
            mean, sd = _agreement(_both(seeds), method, "cosine")
            if mean is not None:
                agreement.setdefault(f"{METHOD_NAMES[method]}, {line}", []).append((alpha, mean, sd))
    written = []
    if gains:
        written.append(report.plot_points(
            gains, folder / "heterogeneity-gain.png", xlabel="Dirichlet alpha (lower = more skewed)", log_x=True, reference=0.0,
            ylabel="MoPs' gain over FedPrompt\n(% of FedPrompt's perplexity; above 0 = MoPs better)",
            title="MoPs' gain against heterogeneity (mean ± sd over seeds)",
        ))
    if rouge:
        written.append(report.plot_points(
            rouge, folder / "heterogeneity-rouge.png", xlabel="Dirichlet alpha (lower = more skewed)", log_x=True, reference=0.0,
            ylabel="MoPs' ROUGE-L minus FedPrompt's (points)", title="MoPs' ROUGE-L gain against heterogeneity (mean ± sd over seeds)",
        ))
    if agreement:
        written.append(report.plot_points(
            agreement, folder / "heterogeneity-agreement.png", xlabel="Dirichlet alpha (lower = more skewed)", log_x=True,
            ylabel="clients' prompt updates: mean pairwise cosine", reference=0.0,
            title="Update agreement against heterogeneity (MoPs per expert by gate)",
        ))
    return written


# ---------------------------------------------------------------------- personalization: each client's own data

ARM_NAMES = {"fedprompt": "FedPrompt", "mops": "MoPs, one gate", "mops-local": "MoPs, a gate per client"}
PersonalKey = tuple[str, str, float]  # dataset, compression, alpha


def _arm(record: dict) -> str:
    """The method as trained: FedPrompt, MoPs averaging its gate, or MoPs whose clients keep their own."""
    local = record["method"] == "mops" and record["settings"].get("gate-aggregation") == "local"
    return "mops-local" if local else record["method"]


def personal_arms(records: Sequence[dict]) -> dict[PersonalKey, dict[int, dict[str, dict]]]:
    """(dataset, compression, alpha) -> seed -> arm -> record, for federated main cells whose evaluating clients
    also scored after adapting a copy on their own data (personalize-steps); {} where none did."""
    arms: dict[PersonalKey, dict[int, dict[str, dict]]] = {}
    for r in records:
        if r["kind"] == "federated" and r["study"] == "main" and r.get("client_adapted_perplexity") is not None:
            key = (r["dataset"], r["compression"], float(r["settings"]["alpha"]))
            arms.setdefault(key, {}).setdefault(int(r["settings"]["seed"]), {})[_arm(r)] = r
    return dict(sorted(arms.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])))


def _relative(before: float | None, after: float | None) -> float | None:
    """How much lower `after` is than `before`, in % of `before` (positive = lower = better)."""
    return None if before is None or after is None else 100 * (before - after) / before


def _spread(runs: Sequence[dict], field: str) -> str:
    """The clients' p10 / p50 / p90 of the last round, each a mean over seeds."""
    last = [(r.get("rounds") or [{}])[-1].get(field) or {} for r in runs]
    return " / ".join(_num(_ppl(last, q)[0], 2) for q in ("p10", "p50", "p90"))


def _gains(values: Iterable[float | None]) -> str:
    """Gains in %, mean ± sd over seeds; '-' where there is none."""
    known = [v for v in values if v is not None]
    return _pct(*_mean_sd(known)) if known else "-"


def personal_table(records: Sequence[dict]) -> ResultTable | None:
    """Each arm's perplexity on the clients' own held-out data as trained and after each client adapted a copy
    (its gate; FedPrompt: its prompts) for personalize-steps steps, against the test split, alpha by alpha."""
    rows = []
    for (dataset, compression, alpha), seeds in personal_arms(records).items():
        for arm in ARM_NAMES:
            runs = {seed: methods[arm] for seed, methods in seeds.items() if arm in methods}
            if not runs:
                continue
            adapting = [_relative(r["client_perplexity"], r["client_adapted_perplexity"]) for r in runs.values()]
            over_fedprompt = [_relative(seeds[seed]["fedprompt"]["client_adapted_perplexity"], r["client_adapted_perplexity"])
                              for seed, r in runs.items() if arm != "fedprompt" and "fedprompt" in seeds[seed]]
            mb = [r["bytes_communicated"] / 1e6 for r in runs.values() if r.get("bytes_communicated")]
            rows.append([
                dataset, compression, f"{alpha:g}", ARM_NAMES[arm], str(len(runs)),
                _with_sd(*_ppl(list(runs.values()))),
                _with_sd(*_ppl(list(runs.values()), "client_perplexity")), _spread(list(runs.values()), "client_spread"),
                _with_sd(*_ppl(list(runs.values()), "client_adapted_perplexity")), _spread(list(runs.values()), "client_adapted"),
                _gains(adapting), _gains(over_fedprompt),
                _minutes(list(runs.values())), f"{sum(mb) / len(mb):.1f}" if mb else "-",
            ])
    if not rows:
        return None
    headers = ["data", "compression", "alpha", "trained as", "seeds", "test ppl", "clients' ppl", "p10 / p50 / p90",
               "adapted", "p10 / p50 / p90", "adapting gains", "adapted: gain over FedPrompt", "minutes per cell", "MB sent and received"]
    return ResultTable("Personalization: the clients' own held-out data, as trained and after adapting", headers, rows,
                "after the last round; test ppl: the test split with the global model (global gate); clients' ppl: each "
                "evaluating client on its held-out share, token-weighted over clients, with its own gate where the gate is "
                "local, and the clients' p10 / p50 / p90; adapted: the same after the client adapted a copy of its gate "
                "(FedPrompt: its prompts) for personalize-steps steps on its training share; gains in % of the perplexity "
                "they lower, paired seed by seed, mean ± sd over seeds (positive = better); each cell's wall time and "
                "bytes over all rounds, mean over seeds")


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def personal_gains(records: Sequence[dict]) -> dict[str, dict[str, list[tuple[float, float, float | None]]]]:
    """Panel ("dataset-compression") -> "arm, as trained|adapted" -> (alpha, mean, sd) of each MoPs arm's gain over
    FedPrompt on the clients' own data (in % of FedPrompt's perplexity, the same measure, paired seed by seed)."""
    panels: dict[str, dict[str, list]] = {}
    for (dataset, compression, alpha), seeds in personal_arms(records).items():
        series = panels.setdefault(f"{dataset}-{compression}", {})
        for arm in ("mops", "mops-local"):
            for field, how in (("client_perplexity", "as trained"), ("client_adapted_perplexity", "adapted")):
                mean, sd = _paired(seeds, field, True, arm)
                if mean is not None:
                    series.setdefault(f"{ARM_NAMES[arm]}, {how}", []).append((alpha, mean, sd))
    return {panel: series for panel, series in panels.items() if series}


def personal_figures(records: Sequence[dict], folder: Path) -> list[Path]:
    """Per dataset: the clients' held-out perplexity against alpha, each arm as trained and after adapting; and each
    MoPs arm's gain over FedPrompt, paired by seed, which the first figure's spread over seeds would hide."""
    by_dataset: dict[str, dict[str, list]] = {}
    for (dataset, compression, alpha), seeds in personal_arms(records).items():
        series = by_dataset.setdefault(f"{dataset}-{compression}", {})
        for arm in ARM_NAMES:
            runs = [methods[arm] for methods in seeds.values() if arm in methods]
            for field, how in (("client_perplexity", "as trained"), ("client_adapted_perplexity", "adapted")):
                mean, sd = _ppl(runs, field)
                if mean is not None:
                    series.setdefault(f"{ARM_NAMES[arm]}, {how}", []).append((alpha, mean, sd))
    written = [report.plot_points(
        series, folder / f"personal-{_file_part(panel)}.png", log_x=True,
        xlabel="Dirichlet alpha (lower = more skewed)", ylabel="clients' held-out perplexity\n(token-weighted; lower is better)",
        title=f"{panel}: the clients' own data, as trained and adapted (mean ± sd over seeds)",
    ) for panel, series in by_dataset.items() if series]
    written += [report.plot_points(
        series, folder / f"personal-gain-{_file_part(panel)}.png", log_x=True, reference=0.0,
        xlabel="Dirichlet alpha (lower = more skewed)",
        ylabel="gain over FedPrompt on the clients' own data\n(% of FedPrompt's perplexity; above 0 = better)",
        title=f"{panel}: MoPs' gain over FedPrompt (paired by seed, mean ± sd)",
    ) for panel, series in personal_gains(records).items()]
    return written


# ---------------------------------------------------------------------- federated runs round by round

REGIME_SETTINGS = ("alpha", "partitioner", "local-steps", "num-server-rounds", "fraction-train")


def round_series(records: Sequence[dict]) -> dict[str, dict[str, dict[int, dict[int, dict]]]]:
    """(panel "dataset, compression") -> method -> seed -> round -> that round of the record, for federated main
    cells where each panel's cells share one training regime of at least three rounds; {} otherwise (a sweep
    over alpha or local steps is the heterogeneity figures' to draw)."""
    panels: dict[str, dict[str, dict[int, dict[int, dict]]]] = {}
    regimes: dict[str, set] = {}
    for r in records:
        if r["kind"] != "federated" or r["study"] != "main" or not r.get("rounds") or _arm(r) == "mops-local":
            continue
        panel = f"{r['dataset']}, {r['compression']}"
        regimes.setdefault(panel, set()).add(tuple(r["settings"].get(k) for k in REGIME_SETTINGS))
        panels.setdefault(panel, {}).setdefault(r["method"], {})[r["settings"]["seed"]] = {row["round"]: row for row in r["rounds"]}
    if any(len(regime) > 1 for regime in regimes.values()) or max((len(rows) for methods in panels.values()
                                                                    for seeds in methods.values() for rows in seeds.values()), default=0) < 3:
        return {}
    return panels


def round_gains(methods: dict[str, dict[int, dict[int, dict]]], field: str) -> dict[int, tuple[list[int], list[float]]]:
    """Seed -> (rounds, MoPs' gain over FedPrompt in % of FedPrompt's `field`) where both methods of the seed have it."""
    gains = {}
    for seed, fed in (methods.get("fedprompt") or {}).items():
        mops = (methods.get("mops") or {}).get(seed)
        if mops is None:
            continue
        rounds = [n for n in sorted(fed) if n in mops and fed[n].get(field) and mops[n].get(field) is not None]
        if rounds:
            gains[seed] = (rounds, [100 * (fed[n][field] - mops[n][field]) / fed[n][field] for n in rounds])
    return gains


def round_table(records: Sequence[dict], at: Sequence[int] = (5, 10, 20)) -> ResultTable | None:
    """Each seed's FedPrompt and MoPs test perplexity after rounds `at` (those the runs reached, else their last),
    MoPs' gain there on the test split, and at the last on the clients' own data and in ROUGE-L; then each
    panel's mean ± sd over the paired seeds. Cells still running (`under_way` in their record) show the rounds
    they have, their seed marked."""
    panels = round_series(records)
    if not panels:
        return None
    last = max(n for methods in panels.values() for seeds in methods.values() for rows in seeds.values() for n in rows)
    marks = [n for n in at if n <= last] or [last]
    end = marks[-1]
    headers = ["data, compression", "seed", *[f"{METHOD_NAMES[m]} r{n}" for m in ("fedprompt", "mops") for n in marks],
               *[f"gain r{n}" for n in marks], f"clients' gain r{end}", f"ROUGE-L r{end} (F / M)", "hours (F / M)"]
    rows = []

    def ppl(rows_: dict[int, dict] | None, n: int) -> float | None:
        return (rows_ or {}).get(n, {}).get("perplexity")

    def gain(fed: dict | None, mops: dict | None, n: int, field: str = "perplexity") -> float | None:
        f, m = (fed or {}).get(n, {}).get(field), (mops or {}).get(n, {}).get(field)
        return None if f is None or m is None else 100 * (f - m) / f

    def rouge(rows_: dict[int, dict] | None) -> str:
        value = (rows_ or {}).get(end, {}).get("rouge_l")
        return "-" if value is None else f"{value:.1f}"

    hours = {(r["dataset"], r["compression"], r["method"], r["settings"]["seed"]): r.get("wall_seconds") for r in records}
    running = {(f"{r['dataset']}, {r['compression']}", r["settings"]["seed"]) for r in records if r.get("under_way")}
    if running:  # while a pair is under way, its latest shared round is the answer so far
        headers.append("so far: last round both reached")

    def so_far(fed: dict | None, mops: dict | None) -> str:
        shared = set(fed or {}) & set(mops or {})
        if not shared:
            return "-"
        n = max(shared)
        clients = gain(fed, mops, n, "client_perplexity")
        return f"r{n}: {_pct(gain(fed, mops, n), None)}" + ("" if clients is None else f" (clients' {_pct(clients, None)})")
    for panel, methods in panels.items():
        fed_runs, mops_runs = methods.get("fedprompt") or {}, methods.get("mops") or {}
        paired: dict[str, list[float]] = {}
        for seed in sorted(set(fed_runs) | set(mops_runs)):
            fed, mops = fed_runs.get(seed), mops_runs.get(seed)
            gains = [gain(fed, mops, n) for n in marks] + [gain(fed, mops, end, "client_perplexity")]
            for name, value in zip([*marks, "clients"], gains):
                if value is not None:
                    paired.setdefault(str(name), []).append(value)
            dataset, compression = panel.split(", ", 1)
            wall = [hours.get((dataset, compression, m, seed)) for m in ("fedprompt", "mops")]
            rows.append([panel, f"{seed} (under way)" if (panel, seed) in running else str(seed), *[_num(ppl(runs, n)) for runs in (fed, mops) for n in marks],
                         *[_pct(g, None) for g in gains], f"{rouge(fed)} / {rouge(mops)}",
                         " / ".join("-" if w is None else f"{w / 3600:.1f}" for w in wall),
                         *([so_far(fed, mops) if (panel, seed) in running else ""] if running else [])])
        if any(len(v) > 1 for v in paired.values()):
            rows.append([panel, "mean ± sd", *["" for _ in marks for _m in ("fedprompt", "mops")],
                         *[_pct(*_mean_sd(paired[str(n)])) if str(n) in paired else "-" for n in marks],
                         _pct(*_mean_sd(paired["clients"])) if "clients" in paired else "-", "", "",
                         *([""] if running else [])])
    return ResultTable("Federated round by round: FedPrompt vs MoPs", headers, rows,
                "test perplexity after each round named (whole test split); gain = 100 x (FedPrompt - MoPs) / FedPrompt, "
                "paired by seed, positive = MoPs lower; clients' gain on every client's own held-out data"
                + ("; a seed under way shows the rounds its cells have reached, their hours so far, and MoPs' gain at "
                   "the last round both have reached" if running else ""))


def round_figures(records: Sequence[dict], folder: Path) -> list[Path]:
    """Test perplexity per round of FedPrompt and MoPs, one panel per dataset and base (seeds thin, their mean
    bold); then MoPs' gain per round, on the test split and on the clients' own held-out data. Cells under
    way draw the rounds they have."""
    panels = round_series(records)
    if not panels:
        return []
    running = sum(1 for r in records if r.get("under_way"))
    note = f" ({running} cell{'s' if running > 1 else ''} under way)" if running else ""
    curves = {panel: {METHOD_NAMES[m]: {seed: (sorted(rows), [rows[n]["perplexity"] for n in sorted(rows)])
                                        for seed, rows in seeds.items()} for m, seeds in methods.items()}
              for panel, methods in panels.items()}
    written = [report.plot_seed_panels(curves, folder / "rounds-perplexity.png", xlabel="round", ylabel="test perplexity",
                                       title="Federated: test perplexity after each round" + note)]
    gains = {panel: {label: seeds for label, field in (("test split", "perplexity"), ("clients' own data", "client_perplexity"))
                     if (seeds := round_gains(methods, field))} for panel, methods in panels.items()}
    gains = {panel: lines for panel, lines in gains.items() if lines}
    if gains:
        written.append(report.plot_seed_panels(
            gains, folder / "rounds-gain.png", xlabel="round", reference=0.0,
            ylabel="MoPs' gain over FedPrompt\n(% of FedPrompt's perplexity; above 0 = MoPs better)",
            title="Federated: MoPs' gain after each round, paired by seed" + note))
    return written


def _study_value(record: dict):
    return record["settings"].get(record["study"]) if record["study"] in record["settings"] else None


def all_tables(records: Sequence[dict], under_way: Sequence[dict] = ()) -> list[ResultTable]:
    """Every table the records fill; `under_way` (cells started and not finished) joins the round-by-round one only."""
    grids = [
        comparison(records, "centralized", "prompt", "Table 2: centralized, prompt-tuning baseline vs MoPs"),
        comparison(records, "federated", "fedprompt", "Table 3: federated, FedPrompt vs MoPs"),
        peft_comparison(records, "Table 4: centralized, prompt tuning, MoPs, LoRA and IA3 at equal steps"),
        round_table([*records, *under_way]),
        gate_diagnostics(records),
        per_task_comparison(records, "centralized", "prompt", "Per task, centralized: prompt tuning vs MoPs"),
        per_task_comparison(records, "federated", "fedprompt", "Per task, federated: FedPrompt vs MoPs"),
        lead_table(records, "centralized", "prompt", "During training, centralized: MoPs' lead over prompt tuning"),
        lead_table(records, "federated", "fedprompt", "During training, federated: MoPs' lead over FedPrompt", parts=8),
        heterogeneity_table(records),
        heterogeneity_trend(records),
        personal_table(records),
    ]
    return [g for g in grids if g is not None]


def mixed_bases(records: Sequence[dict]) -> list[str]:
    """Cells whose settings call for one compressed base but that ran on different ones.

    SparseGPT is deterministic on one machine, but a base pruned again elsewhere (another CPU's
    float rounding, another library version) can differ: the Dolly base at 75% once started 7%
    apart. Paired comparisons across such cells measure the bases, not the methods.
    """
    groups: dict[tuple, dict[str, list[str]]] = {}
    for r in records:
        if r.get("base_fingerprint"):
            key = tuple(str(r["settings"].get(k)) for k in BASE_SETTINGS)
            groups.setdefault(key, {}).setdefault(r["base_fingerprint"], []).append(r["id"])
    warnings = []
    for bases in groups.values():
        if len(bases) > 1:
            listing = "; ".join(f"base {fingerprint[:8]}: {', '.join(ids)}" for fingerprint, ids in bases.items())
            warnings.append(
                f"cells with the same base settings ran on {len(bases)} different compressed bases ({listing}). "
                "Their numbers are not comparable: keep one base's cells, delete the others' folders and run the same "
                "command again (`mops compress` with the cells' settings prints the fingerprint of the base your cache holds)."
            )
    return warnings


def machine_label(record: dict) -> str:
    """Where a cell ran, as a table says it: CPU, cores, bfloat16 units or GPU, dtype, torch; for a federated
    cell resumed on other machines, each with the round it took over at."""
    spans = record.get("machines") or []
    if len(spans) > 1:
        return spans_label(spans, _machine_text)
    m = record.get("machine")
    return _machine_text(m) if m else "machine not recorded"


def spans_label(spans: Sequence[dict], text: Callable[[dict], str]) -> str:
    """What held over a resumed run's spans of rounds: `from round 1: a then from round 8: b`."""
    return " then ".join(f"from round {s['from_round']}: {text(s)}" for s in spans)


def _machine_text(m: dict) -> str:
    units = {"amx": "AMX", "avx512_bf16": "AVX-512 bf16", None: "no bf16 units"}.get(m.get("bf16_units"), m.get("bf16_units"))
    where = f"{m['gpu']}" if m.get("gpu") else f"{m.get('cpu')}, {m.get('cores')} cores, {units}"
    return f"{where}; {m.get('dtype')}; torch {m.get('torch')}"


def _counted(labels: Iterable[str]) -> str:
    """`a (2 cells); b (1 cell)`: each label once, with how many cells carry it."""
    return "; ".join(f"{label} ({n} cell{'s' if n > 1 else ''})" for label, n in sorted(Counter(labels).items()))


def machines_note(records: Sequence[dict]) -> str:
    """One line for the top of the tables: which machines and dtypes the cells ran on, with counts."""
    return "Cells ran on: " + _counted(machine_label(r) for r in records)


def commits_note(records: Sequence[dict]) -> str:
    """One line for the top of the tables: the commits the cells ran at, with counts."""
    return "Commits: " + _counted(r.get("commit") or "not recorded" for r in records)


def mixed_machines(records: Sequence[dict]) -> list[str]:
    """A grid whose cells ran on different machines or dtypes: its paired gains may measure those too
    (bfloat16 rounds differently on AMX, AVX-512 and GPUs, and MoPs' gains have moved with the dtype)."""
    labels = {machine_label(r) for r in records if r.get("machine")}
    if len(labels) < 2:
        return []
    return [f"the cells ran on {len(labels)} different machines or dtypes ({' | '.join(sorted(labels))}): a gain paired "
            "across them measures the machines as well as the methods (each cell's machine is in `results.json`)"]


def grid_warnings(records: Sequence[dict]) -> list[str]:
    """What makes a grid's paired numbers doubtful: cells on different compressed bases, or on different machines."""
    return mixed_bases(records) + mixed_machines(records)


def write_csv(records: Sequence[dict], path: Path) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for r in records:
        writer.writerow({**{k: r["settings"].get(k) for k in CSV_COLUMNS if k in r["settings"]}, **{k: r.get(k) for k in CSV_COLUMNS if k in r},
                         "machine": machine_label(r)})
    atomic.write_bytes(path, buffer.getvalue().encode())
    return path


def write_figures(records: Sequence[dict], folder: Path, under_way: Sequence[dict] = ()) -> list[Path]:
    """Curves per cell group, Fig. 4 per MoPs cell, Figs. 2 and 3 from the sweeps; the round-by-round figures
    with the cells `under_way` too."""
    written = []
    for stale in folder.glob("gate-*.png"):  # heatmaps of cells no longer in the grid would mislead
        stale.unlink()
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in records:
        if r["study"] == "main":
            groups.setdefault((r["kind"], r["dataset"], r["compression"]), []).append(r)
    for (kind, dataset, compression), group in groups.items():
        name = f"curve-{kind}-{dataset}-{compression.replace(':', '-')}.png"
        many_seeds = len({r["settings"]["seed"] for r in group}) > 1
        series, xs = {}, {}
        for r in group:
            label = " ".join([METHOD_NAMES[r["method"]], *[v for v in r.get("variants") or [] if v != "default"][:1]])
            label += f" seed {r['settings']['seed']}" if many_seeds else ""
            series[label], xs[label] = r["curve"]["y"], r["curve"]["x"]
        ylabel = group[0]["curve"]["label"]
        smooth = 1 if kind == "federated" else max(1, min(25, min(len(s) for s in series.values()) // 8))
        written.append(report.plot_curve(
            series, folder / name, x=xs, smooth=smooth, xlabel="round" if kind == "federated" else "step",
            ylabel=ylabel, title=f"{kind}: {dataset}, {compression}",
        ))
    for r in records:
        if r["method"] == "mops" and r["study"] == "main" and r.get("gate_matrix"):
            written.append(report.plot_gate_matrix(
                r["tasks"], r["gate_matrix"], folder / f"gate-{r['id']}.png",
                title=f"Mean gate score per task: {r['kind']} {r['dataset']} {r['compression']}",
                present=[t for t, e in zip(r["tasks"], r.get("task_entropy") or []) if e is not None] or None,
            ))
    for kind, baseline in (("centralized", "prompt"), ("federated", "fedprompt")):
        for draw, name in ((_variants_figure, "variants"), (_per_task_figure, "per-task"), (_lead_figure, "lead")):
            path = draw(records, kind, baseline, folder / f"{name}-{kind}.png")
            if path:
                written.append(path)
    for dataset in sorted({r["dataset"] for r in records}):
        path = _rouge_figure(records, dataset, folder / f"rouge-{re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset)}.png")
        if path:
            written.append(path)
    for study, label, figure in (("inject-layer", "L_int (inject-layer)", "fig2-inject-layer.png"),
                                 ("prompts-per-expert", "prompts per expert", "fig3-prompts-per-expert.png")):
        path = _sweep(records, study, label, folder / figure)
        if path:
            written.append(path)
    written += heterogeneity_figures(records, folder)
    written += round_figures([*records, *under_way], folder)
    written += personal_figures(records, folder)
    return written


def _sweep(records: Sequence[dict], study: str, label: str, path: Path) -> Path | None:
    """Perplexity against one setting: the sweep's cells plus the main cell at the default value."""
    swept = [r for r in records if r["study"] == study]
    if not swept:
        return None
    anchor = swept[0]
    points = sweep_points(records, study)
    series = {m: [v for _, v in sorted(p.items())] for m, p in points.items()}
    xs = {m: sorted(p) for m, p in points.items()}
    return report.plot_curve(
        series, path, x=xs, xlabel=label, ylabel="test perplexity",
        title=f"centralized, {anchor['dataset']}, {anchor['compression']}",
    )


def sweep_points(records: Sequence[dict], study: str) -> dict[str, dict[float, float]]:
    """{method name: {swept value: perplexity}} at the sweep's dataset and compression.

    The main cell joins at its own value; an automatic inject-layer (-1) counts as the layer
    the run resolved it to.
    """
    anchor = next(r for r in records if r["study"] == study)
    points: dict[str, dict[float, float]] = {}
    for r in records:
        same_place = r["kind"] == "centralized" and r["dataset"] == anchor["dataset"] and r["compression"] == anchor["compression"]
        if same_place and r["study"] in (study, "main") and r["method"] in ("mops", "prompt"):
            value = r["settings"][study]
            if study == "inject-layer" and r.get("inject_layer") is not None:
                value = r["inject_layer"]
            points.setdefault(METHOD_NAMES[r["method"]], {})[value] = r["perplexity"]
    return points


def _rouge_figure(records: Sequence[dict], dataset: str, path: Path) -> Path | None:
    """ROUGE-L of every method of the main grid on one dataset, per compression (mean ± sd over seeds)."""
    groups: dict[str, dict[str, tuple[float, float | None]]] = {}
    for r in records:
        if r["dataset"] == dataset and r["study"] == "main" and r.get("rouge_l") is not None and "default" in (r.get("variants") or ["default"]):
            name = ("federated " if r["kind"] == "federated" and r["method"] == "mops" else "") + METHOD_NAMES[r["method"]]
            groups.setdefault(r["compression"], {}).setdefault(name, []).append(r["rouge_l"])
    if not groups:
        return None
    bars = {c: {m: _mean_sd(v) for m, v in methods.items()} for c, methods in groups.items()}
    # From 0, and up to 10 points at least: a point of ROUGE-L on a few dozen answers is noise, not a difference to show.
    return report.plot_bars(bars, path, ylabel="ROUGE-L (%)", title=f"{dataset}: ROUGE-L of greedy answers (higher is better)",
                            signed=True, least_top=10.0)


def _variant_namer(table: dict[Key, object]) -> Callable[[Key], str]:
    """A figure's name for a row: its variant, and its data and compression where the grid has several."""
    places = len({key[:2] for key in table}) > 1
    return lambda key: f"{key[2]} ({key[0]} {key[1]})" if places else key[2]


def _variants_figure(records: Sequence[dict], kind: str, baseline: str, path: Path) -> Path | None:
    """Ablations side by side: mean test perplexity (± sd over seeds) of baseline and MoPs per variant."""
    table = _main(records, kind)
    if len({key[2] for key in table}) < 2:
        return None
    groups = {}
    for (dataset, compression, variant), methods in table.items():
        label = variant if len({k[:2] for k in table}) == 1 else f"{variant}\n{dataset} {compression}"
        groups[label] = {METHOD_NAMES[m]: _ppl(methods.get(m)) for m in (baseline, "mops") if methods.get(m)}
    return report.plot_bars(groups, path, ylabel="test perplexity", title=f"{kind}: variants (mean ± sd over seeds)")


def _per_task_figure(records: Sequence[dict], kind: str, baseline: str, path: Path) -> Path | None:
    """MoPs' gain over the baseline per task (%), one bar per variant: where routing pays and where it costs."""
    gains = per_task_gains(records, kind, baseline)
    if not gains:
        return None
    name = _variant_namer(gains)
    groups: dict[str, dict[str, tuple[float, None]]] = {}
    for key, tasks in gains.items():
        for task, g in tasks.items():
            if g["gain_pct"] is not None:
                groups.setdefault(task, {})[name(key)] = (g["gain_pct"], None)
    if not groups:
        return None
    return report.plot_bars(groups, path, ylabel="MoPs gain over the baseline (%)", signed=True,
                            title=f"{kind}: per task, above 0 = MoPs lower perplexity")


def _lead_figure(records: Sequence[dict], kind: str, baseline: str, path: Path) -> Path | None:
    """MoPs' lead over the baseline through training, one line per variant (mean over the paired seeds)."""
    leads = leads_during_training(records, kind, baseline)
    if not leads:
        return None
    name = _variant_namer(leads)
    series, xs = {}, {}
    for key, lead in leads.items():
        seeds = list(lead["seeds"].values())
        series[name(key)] = [sum(values) / len(seeds) for values in zip(*seeds)]
        xs[name(key)] = lead["x"]
    # a step's lead is noisy; a window of a tenth of the run shows the trend
    smooth = 1 if kind == "federated" else max(1, min(50, min(len(s) for s in series.values()) // 10))
    unit = next(iter(leads.values()))["unit"]
    return report.plot_curve(
        series, path, x=xs, smooth=smooth, xlabel="round" if kind == "federated" else "step",
        ylabel=f"MoPs' lead over {METHOD_NAMES[baseline]}\n({unit}; above 0 = MoPs lower)",
        title=f"{kind}: MoPs against {METHOD_NAMES[baseline]} during training (mean over seeds)", reference=0.0,
    )
