"""The benchmark grid on a tiny model: cells, tables that hold the results file's numbers, figures, resume."""

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tensorboard_events, toy_records

from mops_core.session import sink_token_id
from mops_core.config import Settings
from mops_core.data import TASKS, Formatter, collate
from mops_core.loading import machine
from mops_core.peft_baselines import PeftBaseline
from simulation import tables
from simulation.benchmark import (
    CELL_FILE, COMMITS_FILE, commit_label, federated_runner, finished_cells, main, parse_sets, rounds_done, run_grid, source_commit, stages,
    time_on_disk, write_outputs,
)
from simulation.profiles import PROFILES, QUICK, Cell, Profile, cells, same_settings

TINY = {
    "experts": 3, "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16, "samples": 60, "max-length": 64,
    "steps": 8, "input-prompt-steps": 2, "gate-pretrain-steps": 10, "gate-pretrain-samples": 16, "eval-batch-size": 8,
    "lr": 3e-2,
}


@pytest.fixture
def tiny_profile(tiny_model_dir, toy_data_dir, tmp_path):
    return Profile(
        name="tiny", description="test", model=str(tiny_model_dir), datasets=("dolly",), compressions=("none",),
        centralized_methods=("prompt", "mops"), federated_methods=(),
        common={**TINY, "data-dir": str(toy_data_dir), "model-cache-dir": str(tmp_path / "cache")},
        inject_layers=(1,),
    )


def test_profiles_spell_out_comparable_cells():
    grid = cells(QUICK)
    main_cells = [c for c in grid if c.study == "main"]
    assert {(c.kind, c.method) for c in main_cells} == {
        ("centralized", m) for m in ("prompt", "mops", "lora", "ia3")} | {("federated", m) for m in ("fedprompt", "mops")}
    assert len({c.id for c in grid}) == len(grid)
    # The methods of one table row differ only in the method.
    row = [c for c in main_cells if c.kind == "centralized" and c.compression == "sparsegpt:0.75"]
    differing = {k for c in row for k, v in c.settings.items() if v != row[0].settings[k]}
    assert differing <= {"method"}
    assert {c.settings["inject-layer"] for c in grid if c.study == "inject-layer"} == set(QUICK.inject_layers)


def test_a_finished_run_counts_only_for_exactly_its_settings():
    current = Settings().to_flat()
    assert same_settings(dict(current), current)
    assert not same_settings({k: v for k, v in current.items() if k != "gate-hidden"}, current), "a key it lacks"
    assert not same_settings({**current, "gate-noise": 0.0}, current), "a key this version does not have"
    assert not same_settings({**current, "lr": 0.5}, current)
    # The gate's settings do not act on an ungated method, so they do not tell its runs apart.
    assert same_settings({**current, "gate-floor": 0.1}, current, gated=False)
    assert not same_settings({**current, "gate-floor": 0.1}, current, gated=True)


def test_a_record_from_before_a_setting_existed_is_the_same_cell_at_that_settings_old_value(tmp_path):
    from mops_core.config import ADDED_LATER, RESUMABLE
    from server.history import History, ResumeError
    from simulation.profiles import result_settings

    current = Settings().to_flat()
    older = {k: v for k, v in current.items() if k not in ADDED_LATER}
    assert same_settings(older, current) and result_settings(older) == result_settings(current)  # so its cell id too
    assert not same_settings(older, {**current, "round-deadline": "3x"}), "a run with a deadline is another cell"
    (tmp_path / "results.json").write_text(json.dumps({"settings": older, "info": {}, "rounds": [{"round": 0}]}))
    resumed = History.open(tmp_path, Settings.from_flat({"resume": True, "round-deadline": "600"}))
    assert resumed.rounds == [{"round": 0}]  # a run under way may take a deadline when it resumes
    assert "gate-aggregation" not in RESUMABLE  # yet a run recorded before it existed resumes: it ran with one global gate
    assert History.open(tmp_path, Settings.from_flat({"resume": True})).rounds == [{"round": 0}]
    with pytest.raises(ResumeError, match="gate-aggregation"):
        History.open(tmp_path, Settings.from_flat({"resume": True, "gate-aggregation": "local"}))


def test_a_wrong_setting_fails_before_any_cell_runs(capsys):
    assert main(["--profile", "quick", "--set", "lr=fast", "--dry-run"]) == 2
    assert "lr" in capsys.readouterr().out
    with pytest.raises(Exception, match="KEY=VALUE"):
        parse_sets(["lr"])


def test_variants_and_seeds_options_choose_the_cells_and_name_what_is_wrong(capsys):
    assert not [name for profile in PROFILES.values() for name in profile.variants if "," in name]  # the separator
    assert main(["--profile", "ablation", "--variants", "defaults", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cent-")]
    assert len(listed) == 4 and all(line.rstrip().endswith("defaults") for line in listed)  # 2 methods x 2 seeds
    assert main(["--profile", "ablation", "--variants", "defaults", "--seeds", "0,1,2", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cent-")]
    assert len(listed) == 6 and len({line.split()[0] for line in listed}) == 6  # 2 methods x 3 seeds, all distinct
    assert main(["--profile", "ablation", "--variants", "defaults", "--set", "dataset=sni", "--seeds", "2,3", "--dry-run"]) == 0
    summary = capsys.readouterr().out.splitlines()[0]  # the grid as it runs, not as the profile describes it
    assert summary == "model smollm2; data sni; compression sparsegpt:0.75; seeds 2, 3"
    assert main(["--profile", "ablation", "--seeds", "0,one", "--dry-run"]) == 2
    assert "--seeds" in capsys.readouterr().out
    assert main(["--profile", "ablation", "--variants", "defaults,fast gate", "--dry-run"]) == 2
    message = capsys.readouterr().out
    assert "fast gate" in message and "paper (one lr)" in message


def test_datasets_compressions_methods_and_no_sweeps_choose_the_cells(capsys):
    def listed(*options):
        assert main(["--profile", "quick", *options, "--dry-run"]) == 0
        lines = capsys.readouterr().out.splitlines()
        return lines[0], [line.split()[:2] for line in lines if line.startswith(("cent-", "fede-"))]

    summary, all_cells = listed()
    assert summary == "model smollm2; data dolly; compression sparsegpt:0.75, sparsegpt:2:4; seeds 0"
    assert len(all_cells) == 18 and sum(study != "main" for _, study in all_cells) == 6  # 12 main cells; 4 MoPs sweeps
    assert sum(name.startswith("cent-prompt") for name, study in all_cells if study == "inject-layer") == 2  # and the baseline's
    summary, chosen = listed("--datasets", "dolly,sni", "--compressions", "sparsegpt:0.75", "--methods", "prompt,mops,fedprompt",
                             "--no-sweeps")
    assert summary == "model smollm2; data dolly, sni; compression sparsegpt:0.75; seeds 0"
    assert sorted(name.rsplit("-", 1)[0] for name, _ in chosen) == sorted(
        f"{kind}-{method}-{data}-sparsegpt-0.75" for data in ("dolly", "sni")
        for kind, method in (("cent", "prompt"), ("cent", "mops"), ("fede", "fedprompt"), ("fede", "mops")))
    assert {study for _, study in chosen} == {"main"}
    _, no_mops = listed("--methods", "lora")  # the sweeps are MoPs runs: gone with MoPs
    assert [name.split("-")[1] for name, _ in no_mops] == ["lora", "lora"]
    assert main(["--profile", "quick", "--methods", "mops,lorra", "--dry-run"]) == 2
    assert "--methods: lorra is not one of prompt, mops, lora, ia3, fedprompt" in capsys.readouterr().out


@pytest.mark.slow
def test_grid_tables_and_figures_end_to_end_then_resume(tiny_profile, tmp_path):
    grid = cells(tiny_profile)
    assert [(c.method, c.study) for c in grid] == [("prompt", "main"), ("mops", "main"), ("mops", "inject-layer")]
    out = tmp_path / "bench"
    records, failures = run_grid(grid, out, progress=False)
    assert not failures and len(records) == 3

    results = json.loads((out / "results.json").read_text())["cells"]
    by_method = {r["method"]: r for r in results if r["study"] == "main"}
    for r in results:
        assert r["steps"] == TINY["steps"] and r["wall_seconds"] > 0 and r["settings"]["seed"] == 0
        assert (out / "cells" / r["id"] / CELL_FILE).exists()
    assert by_method["mops"]["trainable_parameters"] > by_method["prompt"]["trainable_parameters"] == 3 * 2 * 32
    assert len(by_method["mops"]["expert_share"]) == 3 and by_method["prompt"].get("expert_share") is None
    assert [r["inject_layer"] for r in results] == [2, 2, 1]  # read back from each run's checkpoint
    assert len({r["base_fingerprint"] for r in results}) == 1 and re.fullmatch(r"[0-9a-f]{32}", results[0]["base_fingerprint"])
    assert "Warning" not in (out / "tables.md").read_text()
    assert all(r["machine"] == machine(Settings.from_flat(r["settings"]).model) for r in results)
    assert f"Cells ran on: {tables.machine_label(results[0])} (3 cells)" in (out / "tables.md").read_text()
    assert {r["commit"] for r in results} == {source_commit()}  # centralized cells: the commit the process started at
    assert f"Commits: {source_commit() or 'not recorded'} (3 cells)" in (out / "tables.md").read_text()
    for r in results:  # each cell's curves, and its row of the hparams table, as TensorBoard's reader finds them
        events = tensorboard_events(out / "cells" / r["id"] / "tensorboard")
        saved = json.loads((out / "cells" / r["id"] / "results.json").read_text())
        steps, losses = zip(*events["scalars"]["train/loss"])
        assert steps == tuple(range(1, TINY["steps"] + 1)) and losses == pytest.approx(saved["train"]["losses"], rel=1e-6)
        ppl_steps, ppl = zip(*events["scalars"]["test/perplexity"])
        assert ppl_steps == (0, TINY["steps"]) and ppl == pytest.approx((saved["before"]["perplexity"], saved["after"]["perplexity"]), rel=1e-6)
        assert events["scalars"]["hparams/perplexity"][0][1] == pytest.approx(r["perplexity"], rel=1e-6)
        assert "_hparams_/session_start_info" in events["hparams"] and "settings/text_summary" in events["tensors"]
        assert ("gate/heatmap" in events["images"]) == (r["method"] == "mops")

    # Table 2 in tables.md holds the results file's numbers, gain and gain in %.
    markdown = (out / "tables.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| dolly | none |"))
    numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)]
    base, mops = by_method["prompt"]["perplexity"], by_method["mops"]["perplexity"]
    assert numbers[:4] == pytest.approx([by_method["prompt"]["perplexity_start"], base, mops, base - mops], abs=2e-3)
    assert numbers[4] == pytest.approx(100 * (base - mops) / base, abs=0.05)  # printed as +x.y%
    rouge = [by_method["prompt"]["rouge_l"], by_method["mops"]["rouge_l"]]  # ROUGE-L of greedy answers, beside
    assert numbers[5:] == pytest.approx(rouge, abs=0.051) and all(0 <= r <= 100 for r in rouge)
    assert by_method["mops"]["task_rouge_l"].keys() == set(by_method["mops"]["tasks"])
    # The per-task table: each task's perplexities from the records, its gain, and the gate's routing of that task.
    section = markdown.split("### Per task, centralized")[1]
    mops_run = by_method["mops"]
    for i, task in enumerate(mops_run["tasks"]):
        row = next(line for line in section.splitlines() if line.startswith(f"| dolly | none | {task} |"))
        b, m = by_method["prompt"]["per_task"][task], mops_run["per_task"][task]
        numbers = [float(x) for x in re.findall(r"[-+]?\d+\.\d+", row)]
        own = mops_run["gate_matrix"][i][i % len(mops_run["expert_share"])]
        assert numbers[:2] == pytest.approx([b, m], abs=6e-4), row
        assert numbers[2] == pytest.approx(100 * (b - m) / b, abs=0.05), row  # printed as +x.y%
        assert numbers[3:] == pytest.approx([mops_run["task_gate_entropy"][task], own, mops_run["task_routing"][task]], abs=0.006)
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("id,kind,method") and ",machine,commit," in csv_lines[0]
    assert all(tables.machine_label(results[0]) in line for line in csv_lines[1:])
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert "curve-centralized-dolly-none.png" in figures and "fig2-inject-layer.png" in figures
    assert "per-task-centralized.png" in figures and "rouge-dolly.png" in figures
    assert any(name.startswith("gate-cent-mops") for name in figures)

    # Resume: finished cells are skipped; a changed setting is a new cell that runs.
    def refuse(cell, folder, *, progress):
        raise AssertionError(f"{cell.id} ran again")

    again, _ = run_grid(grid, out, centralized_runner=refuse, progress=False)
    assert [r["id"] for r in again] == [r["id"] for r in records]
    # A cell that ran on another pruning of the same base is named, in the tables and the results file.
    marker = out / "cells" / records[0]["id"] / CELL_FILE
    saved = json.loads(marker.read_text())
    saved["base_fingerprint"] = "f" * 32
    marker.write_text(json.dumps(saved))
    again, _ = run_grid(grid, out, centralized_runner=refuse, progress=False)
    write_outputs(again, out)
    warnings = json.loads((out / "results.json").read_text())["warnings"]
    assert len(warnings) == 1 and "2 different compressed bases" in warnings[0]
    assert f"base ffffffff: {records[0]['id']}" in warnings[0] and records[1]["id"] in warnings[0]
    assert (out / "tables.md").read_text().startswith(f"**Warning:** {warnings[0]}")
    changed = cells(tiny_profile, {"steps": 9})
    ran = []

    def note(cell, folder, *, progress):
        ran.append(cell.id)
        raise RuntimeError("stopped here")

    _, failed = run_grid(changed, out, centralized_runner=note, progress=False)
    assert len(ran) == 3 and len(failed) == 3 and not set(ran) & {r["id"] for r in records}


def test_a_cell_records_the_commit_it_ran_at_and_whether_the_code_differed(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    assert source_commit(tmp_path) is None  # not a checkout
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "mops_core").mkdir()
    (tmp_path / "mops_core" / "model.py").write_text("A = 1\n")
    (tmp_path / "notes.md").write_text("draft\n")
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert source_commit(tmp_path) == head
    (tmp_path / "notes.md").write_text("edited\n")  # not code: the numbers are still the commit's
    assert source_commit(tmp_path) == head
    (tmp_path / "mops_core" / "model.py").write_text("A = 2\n")
    assert source_commit(tmp_path) == head + "+changes"
    assert tables.commits_note([{"commit": head}, {"commit": head}, {}]) == f"Commits: {head} (2 cells); not recorded (1 cell)"


def test_tables_name_the_machines_and_warn_when_cells_ran_on_several():
    xeon = {"cpu": "Xeon", "cores": 2, "bf16_units": "amx", "gpu": None, "dtype": "bfloat16", "torch": "2.13.0"}
    old = {**xeon, "bf16_units": None, "dtype": "float32"}
    gpu = {**xeon, "gpu": "NVIDIA H200"}
    assert tables.machine_label({"machine": xeon}) == "Xeon, 2 cores, AMX; bfloat16; torch 2.13.0"
    assert tables.machine_label({"machine": old}) == "Xeon, 2 cores, no bf16 units; float32; torch 2.13.0"
    assert tables.machine_label({"machine": gpu}) == "NVIDIA H200; bfloat16; torch 2.13.0"
    assert tables.machine_label({}) == "machine not recorded"  # records written before cells carried it
    assert tables.machines_note([{"machine": xeon}, {"machine": xeon}, {}]) == (
        "Cells ran on: Xeon, 2 cores, AMX; bfloat16; torch 2.13.0 (2 cells); machine not recorded (1 cell)")
    assert tables.mixed_machines([{"machine": xeon}, {"machine": xeon}, {}]) == []  # an unrecorded cell is not judged
    warnings = tables.mixed_machines([{"machine": xeon}, {"machine": old}, {"machine": xeon}])
    assert len(warnings) == 1 and "2 different machines or dtypes" in warnings[0]
    assert tables.machine_label({"machine": xeon}) in warnings[0] and tables.machine_label({"machine": old}) in warnings[0]
    # a federated cell resumed on another machine says which ran which rounds, and counts as mixed
    resumed = {"machine": xeon, "machines": [{"from_round": 1, **old}, {"from_round": 8, **xeon}]}
    assert tables.machine_label(resumed) == ("from round 1: Xeon, 2 cores, no bf16 units; float32; torch 2.13.0 then "
                                             "from round 8: Xeon, 2 cores, AMX; bfloat16; torch 2.13.0")
    assert tables.machine_label({"machine": xeon, "machines": [{"from_round": 1, **xeon}]}) == tables.machine_label({"machine": xeon})
    assert len(tables.mixed_machines([{"machine": xeon}, resumed])) == 1


def test_a_stopped_federated_cell_resumes_from_its_last_round(tmp_path):
    def cell(rounds, **changes):
        return Cell("federated", "mops", {**Settings().to_flat(), "num-server-rounds": rounds, **changes})

    started = {}  # cell id -> the rounds its folder held when the runner started
    stop_after = {"round": 2}

    def flower_run(cell, folder, *, progress):  # resumes like the server, from the rounds on disk
        path = folder / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {"settings": cell.settings, "rounds": [], "info": {}}
        started[cell.id] = [r["round"] for r in results["rounds"]]
        last = min(cell.settings["num-server-rounds"], stop_after["round"])
        results["rounds"] += [
            {"round": r, "perplexity": 30.0 - r, "wall_seconds": 100.0 * r} for r in range(len(results["rounds"]), last + 1)
        ]
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
        if last < cell.settings["num-server-rounds"]:
            raise RuntimeError("stopped")
        return results

    out = tmp_path / "bench"
    grid = [cell(5), cell(5, lr=0.5)]
    _, failed = run_grid(grid[:1], out, federated_runner=flower_run, progress=False)
    assert len(failed) == 1 and not (out / "cells" / grid[0].id / CELL_FILE).exists()
    stop_after["round"] = 99
    records, failed = run_grid(grid, out, federated_runner=flower_run, progress=False)
    assert not failed
    assert started[grid[0].id] == [0, 1, 2], "resumed after round 2, not from round 0"
    assert started[grid[1].id] == [], "another learning rate is another experiment"
    assert [r["round"] for r in records[0]["rounds"]] == list(range(6))
    assert records[0]["wall_seconds"] >= 200.0, "the two rounds run before it stopped count"


def test_paired_cells_take_turns_in_stages_and_a_finished_cell_is_one_run_to_its_last_round(tmp_path, capsys):
    def cell(method, seed, rounds=12, **changes):
        return Cell("federated", method, {**Settings().to_flat(), "method": method if method == "fedprompt" else "mops",
                                          "seed": seed, "num-server-rounds": rounds, **changes})

    calls = []  # (method, seed, the round the run was asked to stop at)
    broken = set()

    from safetensors.torch import save_file

    from mops_core import checkpoint

    def flower_run(cell, folder, *, progress, until=None):  # the server's resume: from the checkpoint's round
        stop = until or cell.settings["num-server-rounds"]
        calls.append((cell.method, cell.settings["seed"], stop))
        if cell.id in broken and stop > 5:
            raise RuntimeError("the node died")
        path = folder / "results.json"
        results = json.loads(path.read_text()) if path.exists() else {"settings": cell.settings, "rounds": [], "info": {}}
        done = rounds_done(folder)
        results["rounds"] = [r for r in results["rounds"] if r["round"] <= done] + [
            {"round": r, "perplexity": 30.0 - r - (cell.method == "mops"), "wall_seconds": 10.0 * r}
            for r in range(done + 1 if results["rounds"] else 0, stop + 1)]
        saved = folder / "checkpoint"
        saved.mkdir(parents=True, exist_ok=True)
        save_file({"prompts": torch.zeros(1)}, str(saved / checkpoint.WEIGHTS_FILE))
        (saved / checkpoint.CONFIG_FILE).write_text(json.dumps({"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "round": stop}))
        path.write_text(json.dumps(results))
        return results

    grid = [cell("fedprompt", 0), cell("mops", 0), cell("fedprompt", 1), cell("mops", 1),
            Cell("centralized", "prompt", {**Settings().to_flat(), "seed": 0})]
    assert [(n, c.method, until) for n, c, until in stages(grid, 0)] == [(n, c.method, None) for n, c in enumerate(grid, 1)]
    assert [(n, until) for n, _, until in stages(grid, 5)] == [(1, 5), (2, 5), (1, 10), (2, 10), (1, None), (2, None),
                                                                (3, 5), (4, 5), (3, 10), (4, 10), (3, None), (4, None), (5, None)]
    out = tmp_path / "bench"
    # seed 1's MoPs cell had gone to round 7 in an earlier session: it joins at the next stage, 10
    ahead = out / "cells" / grid[3].id
    flower_run(grid[3], ahead, progress=False, until=7)
    calls.clear()
    broken.add(grid[2].id)  # seed 1's FedPrompt fails after its first stage: its partner goes on alone
    records, failed = run_grid(grid[:4], out, federated_runner=flower_run, progress=False, stage_rounds=5)
    assert calls == [("fedprompt", 0, 5), ("mops", 0, 5), ("fedprompt", 0, 10), ("mops", 0, 10), ("fedprompt", 0, 12), ("mops", 0, 12),
                     ("fedprompt", 1, 5), ("fedprompt", 1, 10), ("mops", 1, 10), ("mops", 1, 12)]
    assert [f.id for f, _ in failed] == [grid[2].id]
    assert [(r["method"], r["settings"]["seed"]) for r in records] == [("fedprompt", 0), ("mops", 0), ("mops", 1)]
    assert [r["round"] for r in records[0]["rounds"]] == list(range(13)) and records[0]["wall_seconds"] >= 100.0
    assert not (out / "cells" / grid[2].id / CELL_FILE).exists()  # at round 5 of 12: under way, not finished
    # the round-by-round table shows the cell under way, at the rounds it has
    table = (out / "tables.md").read_text()
    assert "1 (under way)" in table and "0 (under way)" not in table
    # seed 1's pair so far: FedPrompt stopped at round 5 (30 - 5), MoPs one lower at every round: +4.0%
    row = next(line for line in table.splitlines() if "1 (under way)" in line)
    assert row.rstrip(" |").endswith("r5: +4.0%") and "last round both reached" in table
    assert f"Commits: {source_commit() or 'not recorded'} (4 cells)" in table  # the cell under way counted with the three finished
    assert [(u["id"], u["round"]) for u in json.loads((out / "results.json").read_text())["under_way"]] == [(grid[2].id, 5)]
    # the same command goes on from there: the failed cell from round 5, nothing finished runs again
    broken.clear()
    calls.clear()
    records, failed = run_grid(grid[:4], out, federated_runner=flower_run, progress=False, stage_rounds=5)
    assert not failed and calls == [("fedprompt", 1, 10), ("fedprompt", 1, 12)] and len(records) == 4
    assert "under way" not in (out / "tables.md").read_text()


def test_a_cell_under_way_on_another_base_is_left_before_anything_starts(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    import simulation.benchmark as benchmark
    from mops_core import checkpoint
    from mops_core.session import Session

    settings = {**Settings().to_flat(), "model": str(tiny_model_dir), "data-dir": str(toy_data_dir),
                "model-cache-dir": str(tmp_path / "cache"), "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16,
                "samples": 70, "max-length": 64, "num-server-rounds": 3}
    cell = Cell("federated", "mops", settings)
    folder = tmp_path / "bench" / "cells" / cell.id
    session = Session.open(Settings.from_flat(settings), progress=False)
    saved = checkpoint.save(folder / "checkpoint", session.model, session.settings, session.tasks, {"round": 2})
    config = json.loads((saved / checkpoint.CONFIG_FILE).read_text())
    here = config["base_fingerprint"]
    (saved / checkpoint.CONFIG_FILE).write_text(json.dumps({**config, "base_fingerprint": "f6c1caa2" + "0" * 24}))
    launched = []
    monkeypatch.setattr(benchmark, "launch", lambda *a, **k: launched.append(a) or 0)
    records, failed = run_grid([cell], tmp_path / "bench", federated_runner=federated_runner(3, 1, 0.0), progress=False)
    assert not records and not launched, "neither Ray nor a SuperLink started"
    (failure,) = [why for _, why in failed]
    assert failure.startswith(f"its rounds 1-2 tuned the base with fingerprint f6c1caa2{'0' * 24}, and its settings prune to {here} here")
    assert f"delete {folder} to start it again here" in failure
    # on its own base it is launched
    (saved / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
    _, failed = run_grid([cell], tmp_path / "bench", federated_runner=federated_runner(3, 1, 0.0), progress=False)
    assert len(launched) == 1 and failed[0][1] == "flwr run exited with code 0"  # the spy ran nothing


def test_export_copies_finished_records_and_what_a_cell_under_way_needs_to_resume_elsewhere(tmp_path, capsys):
    from mops_core.checkpoint import CONFIG_FILE, WEIGHTS_FILE
    from simulation.benchmark import export_records

    grid = [Cell("federated", m, {**Settings().to_flat(), "method": m}) for m in ("fedprompt", "mops")]
    grid.append(Cell("federated", "mops", {**Settings().to_flat(), "seed": 3}))  # never started
    out, dest = tmp_path / "runs", tmp_path / "records"
    done, running = (out / "cells" / c.id for c in grid[:2])
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")  # the run's own files stay behind: a finished cell is its record
    (done / CELL_FILE).write_text(json.dumps({"kind": "federated", "method": "fedprompt", "settings": grid[0].settings}))
    (running / "checkpoint").mkdir(parents=True)
    (running / "checkpoint" / CONFIG_FILE).write_text(json.dumps({"round": 7}))
    (running / "checkpoint" / WEIGHTS_FILE).write_bytes(b"tensors")
    (running / "results.json").write_text(json.dumps({"rounds": [{"round": r, "wall_seconds": 60.0 * r} for r in range(9)]}))  # a round ahead
    (running / COMMITS_FILE).write_text(json.dumps([{"from_round": 1, "commit": "1439aa3"}]))  # the code it ran
    # the clients' kept replies: those of round 8, the round under way, go along; an older round's do not
    (running / "replies").mkdir()
    for name in ("partition-3-round-8-ab12.safetensors", "partition-5-round-7-cd34.safetensors"):
        (running / "replies" / name).write_bytes(b"reply")
    (running / "gate_heatmap.png").write_bytes(b"png")  # figures are redrawn: not copied
    # the record of an earlier export, now finished: what resuming needed goes
    (dest / "cells" / done.name / "checkpoint").mkdir(parents=True)
    (dest / "cells" / done.name / "results.json").write_text("{}")

    exported = export_records(grid, out, dest)
    assert exported == [(done.name, "finished"), (running.name, "under way: checkpoint of round 7")]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()) == sorted([
        f"cells/{done.name}/{CELL_FILE}", f"cells/{running.name}/checkpoint/{CONFIG_FILE}",
        f"cells/{running.name}/checkpoint/{WEIGHTS_FILE}", f"cells/{running.name}/results.json",
        f"cells/{running.name}/{COMMITS_FILE}", f"cells/{running.name}/replies/partition-3-round-8-ab12.safetensors"])
    assert (dest / "cells" / running.name / "checkpoint" / WEIGHTS_FILE).read_bytes() == b"tensors"
    spans = [{"from_round": 1, "commit": "1439aa3"}]  # the record itself names its code
    assert json.loads((dest / "cells" / running.name / "results.json").read_text())["info"]["commits"] == spans
    assert json.loads((dest / "cells" / running.name / "checkpoint" / CONFIG_FILE).read_text()) == {"round": 7, "commits": spans}
    # copied back into place, the cell under way is found to resume and the finished one finished
    assert finished_cells(dest)[0]["method"] == "fedprompt" and time_on_disk(dest / "cells" / running.name) == 480.0
    assert rounds_done(dest / "cells" / running.name) == 7  # where it resumes (results.json is a round ahead)
    assert main(["--profile", "regime", "--out", str(out), "--export", str(dest)]) == 0
    assert "0 of 8 cells copied" in capsys.readouterr().out  # the regime's cells are not these


def test_a_cell_notes_the_commit_of_each_span_of_its_rounds_as_it_resumes(tmp_path, capsys):
    from mops_core.checkpoint import CONFIG_FILE
    from simulation.benchmark import note_commit, read_commits

    folder = tmp_path / "cell"
    folder.mkdir()
    assert note_commit(folder, "1439aa3") == [{"from_round": 1, "commit": "1439aa3"}]  # starts: no checkpoint yet
    (folder / "checkpoint").mkdir()
    (folder / "checkpoint" / CONFIG_FILE).write_text(json.dumps({"round": 3}))
    assert note_commit(folder, "1439aa3") == [{"from_round": 1, "commit": "1439aa3"}]  # resumed with the same code
    assert note_commit(folder, "890da60+changes") == [{"from_round": 1, "commit": "1439aa3"},
                                                      {"from_round": 4, "commit": "890da60+changes"}]
    (folder / "checkpoint" / CONFIG_FILE).write_text(json.dumps({"round": 1}))  # resumed from an older checkpoint
    assert note_commit(folder, None) == [{"from_round": 1, "commit": "1439aa3"}, {"from_round": 2, "commit": None}]
    assert read_commits(folder) == [{"from_round": 1, "commit": "1439aa3"}, {"from_round": 2, "commit": None}]
    assert commit_label(folder) == "from round 1: 1439aa3 then from round 2: not recorded"
    (folder / COMMITS_FILE).write_text(json.dumps([{"from_round": 1, "commit": "1439aa3"}]))
    assert commit_label(folder) == "1439aa3"
    for damaged in ("{not json", json.dumps({"from_round": 1}), json.dumps([{"commit": "1439aa3"}])):
        (folder / COMMITS_FILE).write_text(damaged)  # said, and the run goes on noting its own
        assert commit_label(folder) is None
        assert note_commit(folder, "890da60") == [{"from_round": 2, "commit": "890da60"}]
        assert "unreadable" in capsys.readouterr().out
    assert commit_label(tmp_path) is None  # nothing noted


def test_cells_are_held_to_one_base_only_where_their_settings_call_for_one():
    def rec(cell_id, fingerprint, **settings):
        return {"id": cell_id, "base_fingerprint": fingerprint, "settings": {**Settings().to_flat(), **settings}}

    assert tables.mixed_bases([
        rec("a", "1" * 32, compression="sparsegpt:0.75"), rec("b", "2" * 32, compression="sparsegpt:0.5"),
        rec("c", "3" * 32, compression="sparsegpt:0.75", **{"calibration-samples": 64}),
        rec("d", None, compression="sparsegpt:0.75"),  # a cell that never recorded its base is not judged
        rec("e", "1" * 32, compression="sparsegpt:0.75", seed=1, lr=0.5),  # seed and training do not decide the base
    ]) == []
    warnings = tables.mixed_bases([
        rec("a", "1" * 32, dataset="sni"), rec("b", "2" * 32, dataset="sni"), rec("c", "1" * 32, dataset="sni", seed=3),
    ])
    assert len(warnings) == 1 and "base 11111111: a, c; base 22222222: b" in warnings[0]
    # The arithmetic of pruning decides the base too: float32 and float64 bases are not held to each other.
    warnings = tables.mixed_bases([rec("x32", "5" * 32, **{"prune-dtype": "float32"}), rec("x64", "6" * 32)])
    assert warnings == []


def test_the_lead_during_training_pairs_each_mops_run_with_the_baseline_of_its_seed(tmp_path):
    def rec(kind, method, seed, ys, variant="defaults"):
        xs = list(range(len(ys))) if kind == "federated" else list(range(1, len(ys) + 1))
        return {"kind": kind, "study": "main", "dataset": "dolly", "compression": "none", "method": method,
                "variants": [variant], "settings": {"seed": seed}, "curve": {"x": xs, "y": ys, "label": "loss"}}

    # Centralized: ten steps, MoPs' loss 0.5 above the baseline's for the first half, 0.1 below it after (seed 0);
    # seed 1 starts level and ends 0.3 below. Seed 2 has no baseline and must not count.
    base = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1]
    records = [
        rec("centralized", "prompt", 0, base), rec("centralized", "prompt", 1, base),
        rec("centralized", "mops", 0, [y + 0.5 for y in base[:5]] + [y - 0.1 for y in base[5:]]),
        rec("centralized", "mops", 1, [y + 0.0 for y in base[:5]] + [y - 0.3 for y in base[5:]]),
        rec("centralized", "mops", 2, base),
    ]
    leads = tables.leads_during_training(records, "centralized", "prompt")
    lead = leads[("dolly", "none", "defaults")]
    assert sorted(lead["seeds"]) == [0, 1]
    assert lead["seeds"][0] == pytest.approx([-0.5] * 5 + [0.1] * 5)
    grid = tables.lead_table(records, "centralized", "prompt", "lead", parts=2)
    assert grid.headers == ["data", "compression", "seeds", "steps 1-5", "steps 6-10"]
    # per part: the mean over its steps, then mean ± sd over seeds: (-0.5, 0.0) and (0.1, 0.3)
    assert grid.rows == [["dolly", "none", "2", "-0.250 ± 0.354", "0.200 ± 0.141"]]

    # Federated: the lead in % of the baseline's test perplexity, after the round that ends each part.
    fed = [rec("federated", "fedprompt", 0, [100.0, 90.0, 80.0, 70.0]), rec("federated", "mops", 0, [110.0, 90.0, 76.0, 63.0])]
    grid = tables.lead_table(fed, "federated", "fedprompt", "lead", parts=8)
    assert grid.headers[-4:] == ["round 0", "round 1", "round 2", "round 3"]
    assert [float(v) for v in grid.rows[0][-4:]] == pytest.approx([-10.0, 0.0, 5.0, 10.0])
    # Rows of different lengths in one grid: each says where its parts fall.
    longer = [rec("federated", "fedprompt", 0, [100.0] * 6, "long"), rec("federated", "mops", 0, [95.0] * 6, "long")]
    grid = tables.lead_table(fed + longer, "federated", "fedprompt", "lead", parts=8)
    assert grid.headers[-7:] == ["parts", *[f"part {i}" for i in range(1, 7)]]
    assert grid.rows[0][-7:-2] == ["round 0, round 1, round 2, round 3", "-10.000", "0.000", "5.000", "10.000"]
    assert grid.rows[0][-2:] == ["-", "-"] and grid.rows[1][-6:] == ["5.000"] * 6
    # A MoPs run cut at another length than its baseline has nothing to be paired with.
    fed[1]["curve"] = {"x": [0, 1], "y": [110.0, 90.0], "label": "loss"}
    assert tables.lead_table(fed, "federated", "fedprompt", "lead") is None
    written = tables.write_figures(records, tmp_path)
    assert tmp_path / "lead-centralized.png" in written


def test_sweep_places_an_automatic_inject_layer_at_the_layer_it_resolved_to():
    def rec(method, study, layer, resolved, ppl):
        return {"kind": "centralized", "dataset": "dolly", "compression": "none", "method": method, "study": study,
                "settings": {"inject-layer": layer}, "inject_layer": resolved, "perplexity": ppl}

    records = [rec("mops", "main", -1, 9, 10.0), rec("prompt", "main", -1, 9, 11.0), rec("mops", "inject-layer", 5, 5, 12.0),
               rec("mops", "inject-layer", 15, None, 13.0)]
    assert tables.sweep_points(records, "inject-layer") == {"MoPs": {5: 12.0, 9: 10.0, 15: 13.0}, "prompt tuning": {9: 11.0}}


def test_peft_baseline_scores_like_the_plain_model_before_training(pretrained_base, tokenizer):
    """LoRA starts as the identity (B = 0): its NLL must equal the HF model's own loss on [sink] + text."""
    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:2], 2))
    batch = collate(examples, tokenizer.pad_token_id)
    model = PeftBaseline(copy.deepcopy(pretrained_base), "lora", sink_token_id(tokenizer))
    out = model(**batch)
    sink = torch.full((len(examples), 1), sink_token_id(tokenizer))
    for i in range(len(examples)):
        n = int(batch["attention_mask"][i].sum())
        ids = torch.cat([sink[i], batch["input_ids"][i, :n]]).unsqueeze(0)
        labels = torch.cat([torch.tensor([-100]), batch["labels"][i, :n]]).unsqueeze(0)
        reference = pretrained_base(input_ids=ids, labels=labels).loss * (labels != -100).sum()
        torch.testing.assert_close(out.nll[i], reference, atol=1e-4, rtol=1e-5)
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"default"}
    out.loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())


def test_a_peft_baseline_is_built_without_the_warning_peft_triggers_in_transformers(pretrained_base, tokenizer):
    """PEFT reads transformers' deprecated `is_gradient_checkpointing`: a FutureWarning in every benchmark cell."""
    import warnings

    from peft import get_peft_model

    from mops_core.peft_baselines import peft_config

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        get_peft_model(copy.deepcopy(pretrained_base), peft_config("lora"))
        assert any("is_gradient_checkpointing" in str(w.message) for w in seen)  # PEFT's own call warns
        seen.clear()
        PeftBaseline(copy.deepcopy(pretrained_base), "lora", sink_token_id(tokenizer))
    assert [str(w.message) for w in seen] == []


def test_peft_baselines_answer_in_batches_as_the_model_answers_one_question_at_a_time(pretrained_base, tokenizer):
    formatter = Formatter(tokenizer, 64, TASKS["dolly"])
    model = PeftBaseline(copy.deepcopy(pretrained_base), "lora", sink_token_id(tokenizer))
    with torch.no_grad():  # a LoRA that has learnt something: B != 0
        for name, p in model.peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    questions = [("abc defg", ""), ("ijk lmnop qrs tuv wx", "abc"), ("q", "")]
    never = tokenizer.unk_token_id  # as the end of an answer: all 8 tokens are compared, wherever the model would stop
    batched = model.answer_many(formatter, questions, max_new_tokens=8, batch_size=3, eos_id=never, pad_id=tokenizer.pad_token_id)
    alone = []
    for instruction, context in questions:
        ids = torch.tensor([[sink_token_id(tokenizer)] + formatter.question_ids(instruction, context)])
        out = model.peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  eos_token_id=never, pad_token_id=tokenizer.pad_token_id, top_k=None)
        tokens = out[0, ids.shape[1]:].tolist()
        assert never not in tokens and len(tokens) == 8
        alone.append(tokenizer.decode(tokens, skip_special_tokens=True))
    assert batched == alone and len(set(alone)) > 1


@pytest.mark.slow
def test_a_federated_cell_runs_through_the_flower_app_and_a_stopped_one_resumes_elsewhere_to_the_same_numbers(
        tiny_profile, tmp_path):
    from safetensors.torch import load_file

    from client.replies import kept_round
    from simulation.benchmark import export_records
    from simulation.launch import launch

    profile = Profile(
        **{**tiny_profile.__dict__, "centralized_methods": (), "federated_methods": ("mops",), "inject_layers": (),
           "federated": {"num-server-rounds": 2, "local-steps": 3, "fraction-train": 1.0, "min-available-nodes": 3,
                         "min-partition-size": 2, "fraction-evaluate": 1.0}},
    )
    grid = cells(profile)
    runner = federated_runner(3, 1, 0.0, flwr_home=tmp_path / "home")  # its own SuperLink ports: launch picks them
    records, failures = run_grid(grid, tmp_path / "bench", federated_runner=runner, progress=False)
    assert not failures
    (row,) = records
    assert [r["round"] for r in row["rounds"]] == [0, 1, 2] and row["bytes_communicated"] > 0
    assert row["steps"] == 2 * 3 * 3 and len(row["tasks"]) == 7 and len(row["rounds"][1]["expert_share"]) == 3
    assert row["rounds"][1]["client_spread"]["clients"] == 3 and row["rounds"][2]["rouge_l"] is not None
    assert [m["from_round"] for m in row["machines"]] == [1]
    assert row["commit"] == source_commit() and {"cpu", "bf16_units", "dtype", "torch"} <= set(row["machine"])  # its provenance
    assert json.loads((Path(row["dir"]) / COMMITS_FILE).read_text()) == [{"from_round": 1, "commit": source_commit()}]
    assert "Table 3" in (tmp_path / "bench" / "tables.md").read_text()

    # The same cell stopped after round 1 (a session ends): its folder holds one round, as the run leaves it...
    (cell,) = grid
    stopped = tmp_path / "stopped"
    code = launch({**cell.settings, "num-server-rounds": 1, "out-dir": str(stopped / "cells" / cell.id), "resume": True},
                  supernodes=3, client_cpus=1, flwr_home=tmp_path / "home")
    assert code == 0
    # ...and two of its three clients had finished round 2 when it stopped: they kept their replies (reply-cache-dir),
    # the same as the uninterrupted run's, which kept each client's last one
    kept = sorted((tmp_path / "bench" / "cells" / cell.id / "replies").iterdir())
    assert [kept_round(p.name) for p in kept] == [2, 2, 2]
    (stopped / "cells" / cell.id / "replies").mkdir()
    for reply in kept[:2]:
        shutil.copy2(reply, stopped / "cells" / cell.id / "replies" / reply.name)
    # ...its small record committed, then copied into place on another machine, where the grid goes on from round 1
    assert export_records(grid, stopped, tmp_path / "records") == [(cell.id, "under way: checkpoint of round 1")]
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "records", elsewhere)
    replies = elsewhere / "cells" / cell.id / "replies"
    before = {p.name: p.stat().st_mtime_ns for p in replies.iterdir()}
    assert sorted(before) == [p.name for p in kept[:2]]
    records, failures = run_grid(grid, elsewhere, federated_runner=runner, progress=False)
    assert not failures
    after = {p.name: p.stat().st_mtime_ns for p in replies.iterdir()}
    assert sorted(after) == [p.name for p in kept] and all(after[n] == t for n, t in before.items())  # only the third trained
    (resumed,) = records
    assert [r["perplexity"] for r in resumed["rounds"]] == [r["perplexity"] for r in row["rounds"]]
    assert [r["client_perplexity"] for r in resumed["rounds"]] == [r["client_perplexity"] for r in row["rounds"]]
    assert resumed["wall_seconds"] >= json.loads((stopped / "cells" / cell.id / "results.json").read_text())["rounds"][-1]["wall_seconds"]
    a, b = (load_file(str(folder / "cells" / cell.id / "checkpoint" / "adapter_model.safetensors")) for folder in (tmp_path / "bench", elsewhere))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "the resumed cell ends where the uninterrupted one did"


def test_every_benchmark_script_imports_what_it_uses():
    """The scripts under benchmarks/ run by hand, not in CI: at least their imports must follow the code."""
    import importlib.util

    scripts = sorted((Path(__file__).parent.parent / "benchmarks").glob("*.py"))
    assert scripts
    for path in scripts:
        spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # the scripts only define things until __main__
        assert callable(getattr(module, "main", None)), path.name


def test_the_heterogeneity_cells_differ_only_in_alpha_local_steps_method_and_seed(capsys):
    grid = cells(PROFILES["heterogeneity"])
    assert all(c.kind == "federated" and c.study == "main" for c in grid)
    for dataset, seeds in (("sni", {0, 1, 2}), ("dolly", {0, 1})):
        mine = [c for c in grid if c.dataset == dataset]
        assert len(mine) == 3 * 2 * 2 * len(seeds)  # alpha x local steps x method x seed
        assert {c.settings["seed"] for c in mine} == seeds
        assert {c.settings["alpha"] for c in mine} == {0.1, 0.5, 10.0} and {c.settings["local-steps"] for c in mine} == {20, 100}
        differing = {k for c in mine for k, v in c.settings.items() if v != mine[0].settings[k]}
        assert differing == {"alpha", "local-steps", "num-server-rounds", "method", "seed"}
        # the same client steps in every cell: long local training buys no extra compute
        assert {c.settings["num-server-rounds"] * c.settings["local-steps"] * c.settings["fraction-train"] * 100 for c in mine} == {1000}
        assert all(c.settings["partitioner"] == "inner-dirichlet" for c in mine)
    assert main(["--profile", "heterogeneity", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fede-")]
    assert len(listed) == len(grid) == 60
    seed_and_variant = {tuple(line.split(" seed ")[1].split(maxsplit=1)) for line in listed if line.startswith("fede-mops-sni-")}
    assert seed_and_variant == {
        (str(seed), f"alpha {alpha} / {steps} steps") for seed in (0, 1, 2) for alpha in ("10", "0.5", "0.1") for steps in (20, 100)}


def test_the_regime_cells_run_the_papers_federated_scale_each_dataset_on_its_own_base(capsys, tmp_path):
    grid = cells(PROFILES["regime"])
    assert all(c.kind == "federated" and c.study == "main" for c in grid)
    assert {(c.dataset, c.compression) for c in grid} == {("sni", "sparsegpt:0.75"), ("dolly", "sparsegpt:0.5")}
    assert {(c.dataset, c.settings["seed"], c.method) for c in grid} == {
        (d, seed, m) for d in ("sni", "dolly") for seed in (0, 1) for m in ("fedprompt", "mops")}
    for c in grid:  # the paper's Table 3: 20 rounds of 10 of 100 clients x 250 local steps, at the grid's most skewed split
        assert (c.settings["num-server-rounds"], c.settings["local-steps"], c.settings["fraction-train"]) == (20, 250, 0.1)
        assert (c.settings["partitioner"], c.settings["alpha"]) == ("inner-dirichlet", 0.1)
        assert c.settings["round-timeout"] >= 3 * 3600  # a float32 round on 2 cores is not cut off
    differing = {k for c in grid for k, v in c.settings.items() if v != grid[0].settings[k]}
    assert differing == {"dataset", "compression", "method", "seed"}
    # --compressions names the bases of every dataset
    assert main(["--profile", "regime", "--compressions", "sparsegpt:2:4", "--out", str(tmp_path), "--dry-run"]) == 0
    assert "compression sparsegpt:2:4;" in capsys.readouterr().out
    assert main(["--profile", "regime", "--out", str(tmp_path), "--dry-run"]) == 0
    shown = capsys.readouterr().out
    listed = [line for line in shown.splitlines() if line.startswith("fede-")]
    assert len(listed) == len(grid) == 8 and all("to run" in line for line in listed)
    assert "federated cells in stages of 5 rounds" in shown  # FedPrompt and MoPs of a seed take turns, 5 rounds at a time
    assert main(["--profile", "regime", "--out", str(tmp_path), "--dry-run", "--stage-rounds", "0"]) == 0
    assert "stages" not in capsys.readouterr().out
    assert main(["--profile", "regime", "--out", str(tmp_path), "--dry-run", "--stage-rounds", "-1"]) == 2
    assert "--stage-rounds: must be 0 or more" in capsys.readouterr().out


def test_the_personal_cells_are_fedprompt_and_mops_with_a_global_or_local_gate_each_scored_after_adapting(capsys, tmp_path):
    grid = cells(PROFILES["personal"])
    runs = {(c.dataset, c.settings["alpha"], c.settings["seed"], c.method, c.settings["gate-aggregation"]) for c in grid}
    assert runs == {(d, alpha, seed, m, gates) for d in ("sni", "dolly") for alpha in (10.0, 0.1) for seed in (0, 1)
                    for m, gates in (("fedprompt", "global"), ("mops", "global"), ("mops", "local"))}
    assert {(c.dataset, c.compression) for c in grid} == {("sni", "sparsegpt:0.75"), ("dolly", "sparsegpt:0.5")}
    assert all(c.settings["personalize-steps"] == 20 and c.settings["fraction-evaluate"] > 0 for c in grid)
    assert all((c.settings["num-server-rounds"], c.settings["local-steps"]) == (5, 20) for c in grid)  # as the grid
    assert main(["--profile", "personal", "--out", str(tmp_path), "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fede-")]
    assert len(listed) == 24  # FedPrompt once per split and seed: it has no gate to keep local


def test_the_tables_and_figures_are_drawn_without_torch():
    """A grid's records redrawn elsewhere (`--tables`) need matplotlib, not torch."""
    code = "import sys, simulation.tables; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_cells_record_keeps_each_rounds_test_clients_and_text_scores():
    from simulation.benchmark import round_record

    row = {"round": 5, "perplexity": 9.5, "per_task": {"a": 9.0}, "task_routing": {"a": 0.5}, "seconds": 600.0,
           "agreement": {"cosine": 0.2, "norm_ratio": 0.5}, "gate_matrix": [[1.0]],
           "client_eval": {"perplexity": 11.0, "p10": 8.0, "p50": 10.0, "p90": 14.0, "clients": 100, "per_task": {}},
           "generation": {"rouge_l": 21.5, "exact_match": 3.0, "per_task": {}}}
    kept = round_record(row)
    assert (kept["round"], kept["perplexity"], kept["per_task"], kept["task_routing"], kept["seconds"]) == (5, 9.5, {"a": 9.0}, {"a": 0.5}, 600.0)
    assert kept["client_perplexity"] == 11.0 and kept["client_spread"] == {"p10": 8.0, "p50": 10.0, "p90": 14.0, "clients": 100}
    assert (kept["rouge_l"], kept["exact_match"]) == (21.5, 3.0) and "gate_matrix" not in kept
    assert kept["client_adapted"] is None  # no client adapted before scoring
    bare = round_record({"round": 0, "perplexity": 12.0})  # the start: no clients, no answers scored
    assert bare["client_spread"] is None and bare["rouge_l"] is None and bare["train_loss"] is None
    row["client_eval"]["adapted"] = {"perplexity": 9.0, "p10": 6.0, "p50": 8.5, "p90": 12.0, "per_task": {}}
    assert round_record(row)["client_adapted"] == {"perplexity": 9.0, "p10": 6.0, "p50": 8.5, "p90": 12.0}


def personal_record(arm, alpha, seed, test, clients, adapted, spread=(5.0, 8.0, 20.0)):
    last = {"round": 5, "client_spread": dict(zip(("p10", "p50", "p90"), spread)),
            "client_adapted": dict(zip(("p10", "p50", "p90"), (s / 2 for s in spread)))}
    method, gates = {"fedprompt": ("fedprompt", "global"), "mops": ("mops", "global"), "local": ("mops", "local")}[arm]
    return {"kind": "federated", "study": "main", "method": method, "dataset": "sni", "compression": "sparsegpt:0.75",
            "settings": {"alpha": alpha, "seed": seed, "local-steps": 20, "gate-aggregation": gates}, "perplexity": test,
            "client_perplexity": clients, "client_adapted_perplexity": adapted, "rounds": [last],
            "wall_seconds": 600.0, "bytes_communicated": 2e6 if gates == "local" else 4e6}


def test_the_personal_table_pairs_each_arm_with_fedprompt_seed_by_seed_and_keeps_local_gates_out_of_the_grids_pairs(tmp_path):
    records = [
        personal_record("fedprompt", 0.1, 0, 10.0, 20.0, 16.0), personal_record("fedprompt", 0.1, 1, 10.0, 30.0, 24.0),
        personal_record("mops", 0.1, 0, 9.0, 18.0, 16.0), personal_record("mops", 0.1, 1, 9.0, 30.0, 21.0),
        personal_record("local", 0.1, 0, 9.5, 12.0, 12.0), personal_record("local", 0.1, 1, 9.5, 20.0, 18.0),
        personal_record("fedprompt", 10.0, 0, 10.0, 20.0, 19.0), personal_record("local", 10.0, 0, 9.0, 20.0, 19.0),
    ]
    rows = {(r[2], r[3]): r for r in tables.personal_table(records).rows}
    assert list(rows) == [("10", "FedPrompt"), ("10", "MoPs, a gate per client"), ("0.1", "FedPrompt"),
                          ("0.1", "MoPs, one gate"), ("0.1", "MoPs, a gate per client")]
    fed, local = rows[("0.1", "FedPrompt")], rows[("0.1", "MoPs, a gate per client")]
    assert fed[4] == "2" and fed[6] == "25.000 ± 7.071" and fed[8] == "20.000 ± 5.657"
    assert fed[7] == "5.00 / 8.00 / 20.00" and fed[9] == "2.50 / 4.00 / 10.00"
    assert fed[10] == "+20.0% ± 0.0" and fed[11] == "-"  # adapting: 20% on both seeds; no gain over itself
    # local gates: adapting 0% and 10%; adapted against FedPrompt adapted: 12 vs 16 (+25%), 18 vs 24 (+25%)
    assert local[10] == "+5.0% ± 7.1" and local[11] == "+25.0% ± 0.0" and local[13] == "2.0"
    assert rows[("10", "MoPs, a gate per client")][11] == "+0.0%"  # one seed: no spread
    # the heterogeneity pairs hold the paper's two methods: MoPs with its one gate, never the local-gate run
    pairs = tables.heterogeneity_pairs(records)
    assert pairs[("sni", "sparsegpt:0.75", 20, 0.1)][0]["mops"]["client_perplexity"] == 18.0
    assert "mops" not in pairs[("sni", "sparsegpt:0.75", 20, 10.0)][0]
    # the gain figure's points, paired by seed: one gate at 0.1 as trained 20 -> 18 (+10%) and 30 -> 30 (0%),
    # adapted 16 -> 16 (0%) and 24 -> 21 (+12.5%); local gates at 10 have one seed (no spread)
    gains = tables.personal_gains(records)["sni-sparsegpt:0.75"]
    assert gains["MoPs, one gate, as trained"] == [(0.1, 5.0, pytest.approx(7.0711, abs=1e-4))]
    assert gains["MoPs, one gate, adapted"] == [(0.1, 6.25, pytest.approx(8.8388, abs=1e-4))]
    assert gains["MoPs, a gate per client, adapted"] == [(10.0, 0.0, None), (0.1, 25.0, 0.0)]
    written = tables.personal_figures(records, tmp_path)
    assert [p.name for p in written] == ["personal-sni-sparsegpt-0.75.png", "personal-gain-sni-sparsegpt-0.75.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert tables.personal_table([{**r, "client_adapted_perplexity": None} for r in records]) is None  # nobody adapted


def hetero_record(method, dataset, alpha, steps, seed, ppl, client_ppl, rouge, cosine, ratio, compression="sparsegpt:0.75"):
    return {"kind": "federated", "study": "main", "method": method, "dataset": dataset, "compression": compression,
            "settings": {"alpha": alpha, "local-steps": steps, "seed": seed}, "perplexity": ppl, "client_perplexity": client_ppl,
            "rouge_l": rouge, "agreement": {"cosine": cosine, "norm_ratio": ratio}, "wall_seconds": 900.0 if method == "mops" else 540.0 + 120 * seed}


def test_the_heterogeneity_table_pairs_seeds_and_the_figures_draw(tmp_path):
    records = [
        hetero_record("fedprompt", "sni", 0.1, 20, 0, 10.0, 20.0, 30.0, 0.1, 0.4),
        hetero_record("mops", "sni", 0.1, 20, 0, 9.0, 19.0, 31.0, 0.5, 0.8),
        hetero_record("fedprompt", "sni", 0.1, 20, 1, 12.0, 20.0, 30.0, 0.3, 0.6),
        hetero_record("mops", "sni", 0.1, 20, 1, 11.4, 21.0, 29.0, 0.7, 0.9),
        hetero_record("fedprompt", "sni", 10.0, 20, 0, 10.0, 20.0, 30.0, 0.6, 0.7),
        hetero_record("mops", "sni", 10.0, 20, 0, 10.0, 20.0, 30.0, 0.6, 0.7),
    ]
    # a grid under way: seed 2 has FedPrompt alone, far off the others; it must not move FedPrompt's side of the row
    under_way = hetero_record("fedprompt", "sni", 0.1, 20, 2, 40.0, 20.0, 30.0, 0.9, 0.9)
    grid = tables.heterogeneity_table([*records, under_way])
    rows = {(r[0], r[1], r[2], r[3]): r for r in grid.rows}
    low = rows[("sni", "sparsegpt:0.75", "20", "0.1")]
    # seed 0: 10% better, seed 1: 5% better: mean 7.5, sd 3.5; clients' ppl +5% and -5%; ROUGE-L +1 and -1
    assert low[4] == "2 (+1 unpaired)" and low[5] == "11.000 ± 1.414" and low[6] == "10.200 ± 1.697"
    assert low[7] == "+7.5% ± 3.5" and low[8] == "+0.0% ± 7.1" and low[9] == "+0.0 ± 1.4"
    assert low[10] == "0.200 / 0.600" and low[11] == "0.500 / 0.850"
    assert low[12] == "11 / 15"  # wall time counts every finished cell: (9 + 11 + 13) / 3, 15
    assert tables.heterogeneity_table(records).rows[0][4] == "2"
    assert rows[("sni", "sparsegpt:0.75", "20", "10")][7] == "+0.0%"
    # another compression's cells are another row, not the same seeds overwritten
    other = [hetero_record(m, "sni", 0.1, 20, 0, p, 20.0, 30.0, 0.1, 0.4, compression="sparsegpt:2:4")
             for m, p in (("fedprompt", 20.0), ("mops", 10.0))]
    both = {(r[0], r[1], r[2], r[3]): r for r in tables.heterogeneity_table(records + other).rows}
    assert both[("sni", "sparsegpt:0.75", "20", "0.1")][7] == "+7.5% ± 3.5"
    assert both[("sni", "sparsegpt:2:4", "20", "0.1")][7] == "+50.0%"
    written = tables.heterogeneity_figures(records, tmp_path)
    assert [p.name for p in written] == ["heterogeneity-gain.png", "heterogeneity-rouge.png", "heterogeneity-agreement.png"]
    assert all(p.stat().st_size > 0 for p in written)
    assert tables.heterogeneity_table([r for r in records if r["settings"]["alpha"] == 0.1]) is None  # one alpha: no sweep


def test_the_round_figures_pair_each_seed_round_by_round_and_skip_sweeps(tmp_path):
    def run(method, dataset, seed, ppl, client, **settings):
        rounds = [{"round": n, "perplexity": p, "client_perplexity": c} for n, (p, c) in enumerate(zip(ppl, client))]
        return {"kind": "federated", "study": "main", "method": method, "dataset": dataset, "compression": "sparsegpt:0.75",
                "settings": {"seed": seed, "alpha": 0.1, "local-steps": 250, **settings}, "rounds": rounds}

    records = [
        run("fedprompt", "sni", 0, [20.0, 10.0, 8.0], [None, 12.0, 10.0]), run("mops", "sni", 0, [20.0, 9.0, 6.0], [None, 12.0, 11.0]),
        run("fedprompt", "sni", 1, [20.0, 10.0, 8.0, 7.0], [None, 12.0, 10.0, 9.0]),  # its MoPs still running: no pair
        run("mops", "dolly", 0, [30.0, 25.0, 24.0, 23.0], [None, 26.0, 25.0, 24.0]),
    ]
    panels = tables.round_series(records)
    assert set(panels) == {"sni, sparsegpt:0.75", "dolly, sparsegpt:0.75"}
    assert panels["sni, sparsegpt:0.75"]["fedprompt"][1][3]["perplexity"] == 7.0
    gains = tables.round_gains(panels["sni, sparsegpt:0.75"], "perplexity")
    assert gains == {0: ([0, 1, 2], [0.0, 10.0, 25.0])}  # 100 x (FedPrompt - MoPs) / FedPrompt, seed by seed
    assert tables.round_gains(panels["sni, sparsegpt:0.75"], "client_perplexity") == {0: ([1, 2], [0.0, -10.0])}
    grid = tables.round_table([*records, run("mops", "sni", 1, [20.0, 8.0, 6.0, 6.3], [None, 11.0, 9.0, 9.0])])
    assert grid.headers[:6] == ["data, compression", "seed", "FedPrompt r3", "MoPs r3", "gain r3", "clients' gain r3"]
    rows = {(r[0], r[1]): r for r in grid.rows}
    assert rows[("sni, sparsegpt:0.75", "1")][2:6] == ["7.000", "6.300", "+10.0%", "+0.0%"]
    assert rows[("sni, sparsegpt:0.75", "0")][2:6] == ["-", "-", "-", "-"]  # seed 0 ran two rounds: nothing at round 3
    assert rows[("dolly, sparsegpt:0.75", "0")][2:5] == ["-", "23.000", "-"]  # MoPs alone: no gain
    assert ("sni, sparsegpt:0.75", "mean ± sd") not in rows  # one paired seed: no spread to give
    written = tables.round_figures(records, tmp_path)
    assert [p.name for p in written] == ["rounds-perplexity.png", "rounds-gain.png"] and all(p.stat().st_size for p in written)
    # a sweep over alpha in one panel is the heterogeneity figures' to draw; two rounds show no course
    assert tables.round_series([*records, run("mops", "sni", 2, [20.0, 9.0, 6.0], [None] * 3, alpha=10.0)]) == {}
    assert tables.round_series([run("mops", "sni", 0, [20.0, 9.0], [None, 1.0])]) == {}


def test_the_heterogeneity_trend_differences_each_seed_between_the_ends_of_the_sweep():
    def pair(alpha, seed, fed, mops, cos_f, cos_m):
        return [hetero_record("fedprompt", "sni", alpha, 20, seed, fed, 20.0, 30.0, cos_f, 0.5),
                hetero_record("mops", "sni", alpha, 20, seed, mops, 20.0, 30.0, cos_m, 0.5)]
    records = [
        *pair(10.0, 0, 10.0, 10.0, 0.6, 0.5), *pair(0.1, 0, 10.0, 9.0, 0.2, 0.6),   # gain 0% -> 10%: grows 10 points
        *pair(10.0, 1, 10.0, 9.0, 0.5, 0.5), *pair(0.1, 1, 10.0, 9.5, 0.3, 0.8),    # gain 10% -> 5%: shrinks 5 points
        *pair(0.5, 0, 10.0, 1.0, 0.0, 0.0),                                         # a middle alpha: not an end
        *pair(0.1, 2, 10.0, 1.0, 0.0, 0.0),                                         # seed 2 lacks alpha 10: left out
    ]
    [row] = tables.heterogeneity_trend(records).rows
    assert row[:5] == ["sni", "sparsegpt:0.75", "20", "10 → 0.1", "2"]
    assert row[5] == "+5.0% ± 7.1" and row[6] == "+7.5% ± 3.5"
    assert row[7] == "+2.5 pts ± 10.6" and row[8] == "1 of 2"
    assert row[9] == "-0.300 / +0.200"  # FedPrompt: -0.4 and -0.2; MoPs: +0.1 and +0.3
    # a seed with one method alone at an end is not a pair there
    assert tables.heterogeneity_trend([r for r in records if not (r["settings"]["seed"] == 1 and r["method"] == "mops"
                                                                  and r["settings"]["alpha"] == 10.0)]).rows[0][4] == "1"
    assert tables.heterogeneity_trend(pair(0.1, 0, 10.0, 9.0, 0.2, 0.6)) is None  # one alpha: no sweep


def test_the_cuda_script_asks_only_for_what_the_tools_take():
    """benchmarks/cuda.sh runs where a GPU is lent, rarely: its central runs' flags and settings, and the
    benchmarks' options it passes, are checked here against the parsers, so that a renamed one fails now."""
    import shlex

    from mops_core.cli import _settings_from_args, build_parser

    script = (Path(__file__).resolve().parent.parent / "benchmarks" / "cuda.sh").read_text().replace("\\\n", " ")
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    [train] = [line for line in script.splitlines() if "mops_core.cli train" in line]
    variables = {'"$model"': "smollm2", '"$compression"': "", '"$steps"': "20", '"$out/train-${compression//:/-}"': "out"}
    compressions = re.search(r"for compression in ([^;]+);", script).group(1).split()
    assert compressions == ["int8", "sparsegpt:2:4"]
    for compression in compressions:
        command = train.split("mops_core.cli", 1)[1]
        for name, value in {**variables, '"$compression"': compression}.items():
            command = command.replace(name, value)
        settings = _settings_from_args(build_parser().parse_args(shlex.split(command)))
        assert (settings.model.device, settings.model.dtype, settings.compression.compression) == ("cuda", "bfloat16", compression)
    for tool in ("step_time.py", "eval_speed.py"):
        [line] = [line for line in script.splitlines() if f"benchmarks/{tool}" in line]
        source = (Path(__file__).resolve().parent.parent / "benchmarks" / tool).read_text()
        for option in re.findall(r"(--[a-z-]+)", line):
            assert f'"{option}"' in source, f"{tool} takes no {option}"
