"""The README's main command fails loudly when Flower reports success but the ServerApp wrote nothing."""

import json
import os
import time
from pathlib import Path

import pytest

import simulation.launch as launch_module
from simulation import actors

VISIBLE_GPUS = actors.visible_gpus


@pytest.fixture(autouse=True)
def no_gpus(monkeypatch):
    """Every launch here sees no GPU, whatever this machine has, unless a test gives it some."""
    monkeypatch.setattr(launch_module, "visible_gpus", lambda env=None: [])


def test_a_run_that_wrote_no_round_is_an_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: 0)  # `flwr run` after a ServerApp crash
    assert launch_module.main(["--out-dir", str(tmp_path), "--supernodes", "3"]) == 1
    assert "wrote no new round" in capsys.readouterr().err


def test_a_run_that_wrote_its_rounds_succeeds(monkeypatch, tmp_path):
    def fake(*args, **kwargs):
        (tmp_path / "results.json").write_text(json.dumps({"rounds": [{"round": 0}, {"round": 1}]}))
        return 0

    monkeypatch.setattr(launch_module, "launch", fake)
    assert launch_module.main(["--out-dir", str(tmp_path), "--supernodes", "3"]) == 0


@pytest.mark.slow  # a real process: the launcher as a user starts it
def test_a_wrong_setting_is_refused_at_once_with_one_line_naming_it(tmp_path):
    import subprocess
    import sys
    import time

    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "simulation.launch", "--run-config", "alpha=0.0", "--out-dir", str(tmp_path)],
        cwd=launch_module.PROJECT, capture_output=True, text=True, timeout=60,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: setting 'alpha': must be positive, got 0.0"]
    assert seconds < 5, f"{seconds:.1f} s: the settings must be checked before anything heavy is imported"


@pytest.mark.slow  # a real process: the launcher as a user starts it
def test_a_mistake_that_shows_only_in_the_data_is_refused_at_once_with_one_line(tmp_path, toy_data_dir):
    import os
    import subprocess
    import sys
    import time

    env = {**os.environ, "MOPS_DATA_DIR": str(toy_data_dir)}
    for given, said in (("tasks='nope'", "error: tasks: nope not in dolly (it holds: brainstorming, classification, closed_qa, "),
                        (f"dataset='{tmp_path / 'mine.jsonl'}'", f"error: {tmp_path / 'mine.jsonl'}: no such file or folder")):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "simulation.launch", "--run-config", given, "--out-dir", str(tmp_path)],
                              cwd=launch_module.PROJECT, capture_output=True, text=True, timeout=60, env=env)
        seconds = time.perf_counter() - started
        assert done.returncode == 2 and done.stdout == "", done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(said), line
        assert seconds < 10, f"{seconds:.1f} s: the data must be read before Ray or a SuperLink starts"


def test_data_mistakes_stop_the_launcher_before_it_launches(monkeypatch, tmp_path, capsys, toy_data_dir):
    monkeypatch.setenv("MOPS_DATA_DIR", str(toy_data_dir))
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: pytest.fail("launched despite a data mistake"))
    assert launch_module.main(["--out-dir", str(tmp_path), "--run-config", "tasks='open_qa,nope'"]) == 2
    assert capsys.readouterr().err.startswith("error: tasks: nope not in dolly")
    bad = tmp_path / "mine.jsonl"
    bad.write_text('{"instruction": "q", "response": "a", "task": "t"}\n')  # no context field, as the mapping says there is
    assert launch_module.main(["--out-dir", str(tmp_path), "--run-config", f"dataset='{bad}'"]) == 2
    assert "context-column 'context' is not a field of" in capsys.readouterr().err


def test_the_actor_plan_is_decided_from_what_it_is_given_alone(monkeypatch):
    for name in ("local_cores", "available_memory", "visible_gpus"):  # it asks the machine nothing
        monkeypatch.setattr(actors, name, lambda *a, **k: pytest.fail("plan_actors looked at the machine"))
    gib = 2**30
    plan = actors.plan_actors(10, cores=2, memory=24 * gib, gpus=[], each=None, on_gpu=False)
    assert (plan.cpus, plan.gpus) == (1, 0.0) and plan.lines == (
        "ClientApp actors: 2 of 1 CPU, for 10 clients a round (--client-cpus, --client-gpus to choose)",)
    big = actors.plan_actors(10, cores=16, memory=24 * gib, gpus=[], each=9 * gib, on_gpu=False)
    assert big.cpus == 9 and big.lines[0].startswith("ClientApp actors: 1 of 9 CPUs")  # one actor beside the ServerApp
    assert big.lines[1] == ("  as many as the memory holds beside the ServerApp's: about 9.7 GB a process (the base, "
                            "an activation cache of up to activation-cache-mb, the rest)")
    h100 = actors.Gpu(80 * gib, True)
    on_gpu = actors.plan_actors(10, cores=16, memory=128 * gib, gpus=[h100], each=20 * gib, on_gpu=True)
    assert on_gpu.gpus == 0.5 and on_gpu.cpus == 8 and "a GPU's memory holds, the ServerApp's on the first" in on_gpu.lines[1]
    asked = actors.plan_actors(10, cores=16, memory=None, gpus=[], each=None, on_gpu=False, client_gpus=0.25)
    assert asked.warnings and "--client-gpus 0.25 asks for GPUs" in asked.warnings[0]


def test_the_out_dir_is_given_once_or_twice_alike(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(overrides, **kwargs):
        seen.update(overrides)
        return 0

    monkeypatch.setattr(launch_module, "launch", fake)
    there = tmp_path / "there"
    assert launch_module.main(["--out-dir", str(tmp_path / "here"), "--run-config", f"out-dir='{there}'"]) == 2
    assert "disagree" in capsys.readouterr().err and not seen
    launch_module.main(["--run-config", f"out-dir='{there}'"])  # the run config's alone: the launcher reads there
    assert seen["out-dir"] == str(there) and "wrote no new round to " + str(there) in capsys.readouterr().err


def test_each_run_gets_a_superlink_of_its_own(monkeypatch, tmp_path):
    """A local SuperLink another run left on Flower's default port never receives this run."""
    envs = []

    def fake_run(command, env, cwd, timeout):
        envs.append(env)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(launch_module.subprocess, "run", fake_run)
    launch_module.launch({}, flwr_home=tmp_path / "a")
    launch_module.launch({}, flwr_home=tmp_path / "b")
    ports = [(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"], env["FLWR_LOCAL_CONTROL_API_PORT"]) for env in envs]
    assert "39091" not in {p for pair in ports for p in pair} and ports[0] != ports[1]
    launch_module.launch({}, flwr_home=tmp_path / "c", env={"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "41000"})
    assert envs[-1]["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == "41000"  # a caller's choice stands


def test_a_preset_without_a_local_copy_is_named_before_anything_starts(monkeypatch, tmp_path, capsys, toy_data_dir):
    from mops_core.data import sources as data

    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: 0)
    monkeypatch.delenv("MOPS_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "default_data_dirs", lambda: [tmp_path / "nowhere"])
    launch_module.main(["--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert f"warning: no local copy of dolly (dolly/databricks-dolly-15k.jsonl in {tmp_path / 'nowhere'})" in err
    assert "databricks/databricks-dolly-15k" in err and "$MOPS_DATA_DIR" in err

    monkeypatch.setattr(data, "default_data_dirs", lambda: [tmp_path / "nowhere", toy_data_dir])
    launch_module.main(["--out-dir", str(tmp_path / "run")])
    assert "no local copy" not in capsys.readouterr().err
    launch_module.main(["--out-dir", str(tmp_path / "run"), "--run-config", f"data-dir='{toy_data_dir}'"])
    assert "no local copy" not in capsys.readouterr().err


def test_the_clients_of_a_round_share_the_cores_unless_told(monkeypatch, tmp_path):
    """One actor per client of a round where the cores allow it (each with a share of them), never fewer than one CPU."""
    commands = []

    def fake_run(command, env, cwd, timeout):
        commands.append(command[command.index("--federation-config") + 1])
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(launch_module.subprocess, "run", fake_run)
    monkeypatch.setattr(launch_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    home = tmp_path / "home"
    launch_module.launch({}, supernodes=100, flwr_home=home)  # 10 clients a round (fraction-train 0.1)
    launch_module.launch({}, supernodes=40, flwr_home=home)  # 4
    launch_module.launch({"fraction-train": 0.5}, supernodes=4, flwr_home=home)  # 2
    launch_module.launch({}, supernodes=4, flwr_home=home, extra_run_config=["fraction-train=0.5"])
    launch_module.launch({}, supernodes=100, flwr_home=home, client_cpus=3)  # asked
    launch_module.launch({}, supernodes=4, flwr_home=home, ray_address="head:6379")  # a cluster's cores are not these
    cpus = [int(c.split("client-resources-num-cpus=")[1].split()[0]) for c in commands]
    assert cpus == [1, 4, 8, 8, 3, 2]


def test_no_more_actors_than_their_bases_fit_in_memory(tmp_path):
    """A large base on a small machine trains one client at a time, as before; a small one side by side."""
    def checkpoint(name, **config):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    llama_7b = checkpoint("7b", hidden_size=4096, num_attention_heads=32, num_hidden_layers=32, intermediate_size=11008,
                          vocab_size=32000)
    smol = checkpoint("135m", hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                      intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    assert actors.base_parameters(smol) == 134_515_008  # SmolLM2-135M's, as the released model counts them
    assert actors.base_parameters(llama_7b) == 6_738_415_616  # LLaMA-2-7B's (untied head), as released
    assert actors.base_parameters(str(tmp_path / "missing")) is None
    assert actors.base_parameters("not a/hub id") is None
    assert actors.base_parameters(checkpoint("broken", hidden_size=64)) is None

    gib, settings = 2**30, launch_module.run_settings({})
    big, small = (actors.base_bytes(actors.base_parameters(m), "float32") for m in (llama_7b, smol))
    # Each process holds its base, its activation cache at the bound (2 GiB by default) and 2 GiB more.
    assert actors.footprint(small, settings, on_gpu=False) == small + 4 * gib
    assert actors.footprint(small, settings, on_gpu=True) == small + 3 * gib  # the libraries stay in host memory
    bigger_cache = launch_module.run_settings({"activation-cache-mb": 8192})
    assert actors.footprint(small, bigger_cache, on_gpu=False) == small + 10 * gib
    assert actors.footprint(small, launch_module.run_settings({"activation-cache": False}), on_gpu=False) == small + 2 * gib
    each = {base: actors.footprint(base, settings, on_gpu=False) for base in (big, small)}
    cores = launch_module.os.sched_getaffinity
    try:
        launch_module.os.sched_getaffinity = lambda pid: set(range(2))
        assert actors.actor_cpus(10, each=each[big], memory=24 * gib) == 2  # one actor: 29 GiB each would not fit twice
        assert actors.actor_cpus(10, each=each[small], memory=24 * gib) == 1
        assert actors.actor_cpus(10, each=None, memory=24 * gib) == 1  # nothing known: the cores decide
        # A cache allowed 8 GiB: 10.5 GiB a process, the ServerApp's and one actor's in 19 GiB.
        assert actors.actor_cpus(10, each=actors.footprint(small, bigger_cache, on_gpu=False), memory=24 * gib) == 2
        launch_module.os.sched_getaffinity = lambda pid: set(range(16))
        # Three processes of 29 GiB fit in 102 GiB: the ServerApp's and two actors, so Ray starts 16 // 6 = 2.
        assert actors.actor_cpus(10, each=each[big], memory=128 * gib) == 6
        assert actors.actor_cpus(10, each=each[small], memory=128 * gib) == 1
    finally:
        launch_module.os.sched_getaffinity = cores


def test_the_gpus_torch_would_see_are_those_cuda_visible_devices_names(monkeypatch):
    gib, listed = 2**30, "0, GPU-aaaa, 143771, 9.0\n1, GPU-bbbb, 32768, 7.0\n2, GPU-cccc, 81559, [N/A]\n"
    h200, v100 = actors.Gpu(143771 * 2**20, True), actors.Gpu(32768 * 2**20, False)
    unreported = actors.Gpu(81559 * 2**20, False)
    calls = []

    def nvidia_smi(command, **kwargs):
        calls.append(command[0])
        return type("Done", (), {"stdout": listed})()

    monkeypatch.setattr(launch_module.subprocess, "run", nvidia_smi)
    monkeypatch.setattr("importlib.metadata.version", lambda name: "2.13.0+cu128")
    assert VISIBLE_GPUS({}) == [h200, v100, unreported]  # a capability not reported: counted as without bfloat16 units
    assert VISIBLE_GPUS({"CUDA_VISIBLE_DEVICES": "1"}) == [v100]
    assert VISIBLE_GPUS({"CUDA_VISIBLE_DEVICES": "GPU-aaaa"}) == [h200]
    assert VISIBLE_GPUS({"CUDA_VISIBLE_DEVICES": "1,7,0"}) == [v100]  # CUDA stops at an unknown device
    assert VISIBLE_GPUS({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert calls == ["nvidia-smi"] * 5 and h200.memory > 140 * gib
    monkeypatch.setattr("importlib.metadata.version", lambda name: "2.13.0+cpu")  # a CPU torch cannot use them
    assert VISIBLE_GPUS({}) == [] and len(calls) == 5

    def old_driver(command, **kwargs):  # one that does not know the compute_cap field
        if "compute_cap" in command[1]:
            raise launch_module.subprocess.CalledProcessError(2, command)
        return type("Done", (), {"stdout": "0, GPU-aaaa, 81559\n"})()

    monkeypatch.setattr("importlib.metadata.version", lambda name: "2.13.0")
    monkeypatch.setattr(launch_module.subprocess, "run", old_driver)
    assert VISIBLE_GPUS({}) == [actors.Gpu(81559 * 2**20, False)]  # bfloat16 units unknown: none counted

    def no_driver(command, **kwargs):
        raise FileNotFoundError(command[0])

    monkeypatch.setattr(launch_module.subprocess, "run", no_driver)
    assert VISIBLE_GPUS({}) == []


def test_a_rounds_clients_share_the_gpus_as_their_memory_allows(monkeypatch, tmp_path, capsys):
    gib = 2**30
    h200, a100 = actors.Gpu(139 * gib, True), actors.Gpu(80 * gib, True)
    llama_7b = 16 * gib  # a 7B base in bfloat16 with its activation cache and the rest (`footprint`)
    assert actors.actor_gpus(10, [h200]) == 0.1  # a small base: the whole round side by side
    assert actors.actor_gpus(10, [h200], each=llama_7b) == 0.2  # six fit in four fifths of it, one the ServerApp's
    assert actors.actor_gpus(10, [a100], each=llama_7b) == 0.3333  # four fit: three actors beside the ServerApp
    assert actors.actor_gpus(10, [a100] * 2, each=llama_7b) == 0.3333  # the second GPU would hold four
    assert actors.actor_gpus(10, [a100] * 8, each=llama_7b) == 0.5  # the round spread over eight
    assert actors.actor_gpus(3, [h200]) == 0.3333  # Ray's four decimals, rounded down: three fit
    assert actors.actor_gpus(2, [a100] * 4) == 1.0  # a base is never split over GPUs
    assert actors.actor_gpus(10, [h200], each=200 * gib) == 1.0  # too large for its memory: one at a time
    assert actors.actor_gpus(10, [a100], each=40 * gib) == 1.0  # only one fits, where the ServerApp's is too
    assert actors.actor_gpus(10, []) == 0.0

    runs = []

    def fake_run(command, env, cwd, timeout):
        config = command[command.index("--federation-config") + 1]
        runs.append((config.split("cpus=")[1].split()[0], config.split("gpus=")[1], env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"]))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(launch_module.subprocess, "run", fake_run)
    monkeypatch.setattr(launch_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(launch_module, "visible_gpus", lambda env=None: [h200])
    home = tmp_path / "home"
    launch_module.launch({}, supernodes=100, flwr_home=home)  # the embedded base: ten actors on the GPU
    launch_module.launch({}, supernodes=100, flwr_home=home, client_gpus=0.5)  # asked: two actors, 8 cores each
    launch_module.launch({}, supernodes=100, flwr_home=home, client_gpus=0)  # asked for none: the GPU hidden from them
    launch_module.launch({"device": "cpu"}, supernodes=100, flwr_home=home)  # the run is told to keep off GPUs
    launch_module.launch({}, supernodes=100, flwr_home=home, ray_address="head:6379")  # a cluster's GPUs are not these
    assert runs == [("1", "0.1", "0"), ("8", "0.5", "0"), ("1", "0.0", "1"), ("1", "0.0", "0"), ("2", "0.0", "0")]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("ClientApp actors")]
    assert said == [  # what Ray will start, as Flower's pool counts it: the cores, and the GPU shares
        "ClientApp actors: 10 of 1 CPU and 0.1 GPU, for 10 clients a round (--client-cpus, --client-gpus to choose)",
        "ClientApp actors: 2 of 8 CPUs and 0.5 GPU, for 10 clients a round (--client-cpus, --client-gpus to choose)",
        "ClientApp actors: 16 of 1 CPU, for 10 clients a round (--client-cpus, --client-gpus to choose)",
        "ClientApp actors: 16 of 1 CPU, for 10 clients a round (--client-cpus, --client-gpus to choose)",
        "ClientApp actors: as many as the Ray cluster at head:6379 holds, 2 CPUs each",
    ]


def test_the_bases_are_sized_in_the_dtype_that_auto_gives_the_actors(monkeypatch, tmp_path, capsys):
    """dtype 'auto' runs the base in bfloat16 on a GPU or a CPU with bfloat16 units: half the float32
    bytes, so about twice the actors fit; where the units are missing, float32's size decides."""
    import mops_core.loading

    gib, llama_7b = 2**30, tmp_path / "7b"
    llama_7b.mkdir()
    (llama_7b / "config.json").write_text(json.dumps({"hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 32000,
                                                      "num_hidden_layers": 32, "intermediate_size": 11008}))
    runs = []

    def fake_run(command, env, cwd, timeout):
        config = command[command.index("--federation-config") + 1]
        runs.append((int(config.split("cpus=")[1].split()[0]), float(config.split("gpus=")[1])))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(launch_module.subprocess, "run", fake_run)
    monkeypatch.setattr(launch_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(launch_module, "available_memory", lambda: 128 * gib)

    def run(cpu_bf16: bool, gpus: list, **settings):
        monkeypatch.setattr(mops_core.loading, "cpu_has_fast_bf16", lambda: cpu_bf16)
        monkeypatch.setattr(launch_module, "visible_gpus", lambda env=None: gpus)
        client_gpus = settings.pop("client_gpus", None)
        launch_module.launch({"model": str(llama_7b), **settings}, supernodes=100, flwr_home=tmp_path / "home",
                             client_gpus=client_gpus)
        return runs[-1]

    bf16_units, none = actors.Gpu(80 * gib, True), actors.Gpu(80 * gib, False)
    # On a GPU each process holds its base, a 2 GiB activation cache and 1 GiB more; the ServerApp's is one of them.
    assert run(False, [bf16_units]) == (5, 0.3333)  # 12.6 GiB in bfloat16: four in 64 GiB, three actors
    assert run(False, [none]) == (16, 1.0)  # 25.1 GiB in float32: two, one actor
    assert run(False, [bf16_units, none]) == (8, 1.0)  # an actor may get either GPU
    assert run(False, [bf16_units], dtype="float32") == (16, 1.0)  # asked for float32: float32's size
    assert run(True, [none], dtype="bfloat16") == (5, 0.3333)
    # On the CPUs 2 GiB more each: in bfloat16 six processes of 16.6 GiB in 102 GiB, five actors of 3 CPUs
    assert run(True, []) == (3, 0.0)
    assert run(False, []) == (6, 0.0)  # in float32: three of 29.1 GiB, two actors of 6 CPUs
    assert run(True, [none], client_gpus=0) == (3, 0.0)  # kept off the GPUs: the CPU's bfloat16 units decide
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  as many as")]
    assert said == [  # each run above that memory bounded says so, with the size it went by
        "  as many as a GPU's memory holds, the ServerApp's on the first: about 16.7 GB a process (the base, an activation "
        "cache of up to activation-cache-mb, the rest)",
        *["  as many as a GPU's memory holds, the ServerApp's on the first: about 30.2 GB a process (the base, an "
          "activation cache of up to activation-cache-mb, the rest)"] * 3,
        "  as many as a GPU's memory holds, the ServerApp's on the first: about 16.7 GB a process (the base, an activation "
        "cache of up to activation-cache-mb, the rest)",
        "  as many as the memory holds beside the ServerApp's: about 17.8 GB a process (the base, an activation cache of "
        "up to activation-cache-mb, the rest)",
        "  as many as the memory holds beside the ServerApp's: about 31.2 GB a process (the base, an activation cache of "
        "up to activation-cache-mb, the rest)",
        "  as many as the memory holds beside the ServerApp's: about 17.8 GB a process (the base, an activation cache of "
        "up to activation-cache-mb, the rest)",
    ]
    monkeypatch.setattr(launch_module, "visible_gpus", lambda env=None: [])
    launch_module.launch({"model": str(llama_7b)}, supernodes=20, flwr_home=tmp_path / "home")  # two clients a round
    assert runs[-1] == (8, 0.0) and "as many as" not in capsys.readouterr().out  # the cores, not the memory, set them
    monkeypatch.setattr(mops_core.loading, "cpu_has_fast_bf16", lambda: pytest.fail("a dtype for no size"))
    monkeypatch.setattr(launch_module, "visible_gpus", lambda env=None: [])
    launch_module.launch({}, supernodes=100, flwr_home=tmp_path / "home")  # the embedded base: its size unknown here
    launch_module.launch({"model": str(llama_7b)}, supernodes=100, flwr_home=tmp_path / "home",
                         ray_address="head:6379")  # a Ray cluster's actors: this machine's dtype says nothing of them


@pytest.mark.parametrize("option, problem", [
    (["--client-gpus", "-1"], "a share of one GPU (0 to 1) or a whole number of GPUs"),
    (["--client-gpus", "1.5"], "a share of one GPU (0 to 1) or a whole number of GPUs"),
    (["--client-gpus", "some"], "expected a number of GPUs, got 'some'"),
    (["--client-cpus", "0"], "an actor needs at least one CPU"),
    (["--client-cpus", "1.5"], "expected a whole number of CPUs, got '1.5'"),
])
def test_actor_resources_ray_cannot_schedule_are_refused_before_anything_starts(monkeypatch, tmp_path, capsys, option, problem):
    monkeypatch.setattr(launch_module, "launch", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(SystemExit) as exit:
        launch_module.main([*option, "--out-dir", str(tmp_path)])
    assert exit.value.code == 2 and f"argument {option[0]}: " in (err := capsys.readouterr().err) and problem in err
    from simulation.benchmark import main as benchmark

    with pytest.raises(SystemExit):
        benchmark([*option, "--dry-run"])
    assert problem in capsys.readouterr().err


def test_gpus_asked_where_none_is_seen_are_warned_of(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(launch_module.subprocess, "run", lambda command, **kwargs: type("Done", (), {"returncode": 0})())
    launch_module.launch({}, supernodes=10, flwr_home=tmp_path, client_gpus=0.25)
    assert "--client-gpus 0.25 asks for GPUs, but none that torch could use is visible here" in capsys.readouterr().err
    monkeypatch.setattr(launch_module, "visible_gpus", lambda env=None: [actors.Gpu(80 * 2**30, True)])
    launch_module.launch({}, supernodes=10, flwr_home=tmp_path, client_gpus=0.25)
    launch_module.launch({}, supernodes=10, flwr_home=tmp_path, client_gpus=0)
    assert "warning" not in capsys.readouterr().err


def test_the_fab_holds_the_apps_code_alone_whatever_lies_beside_it(tmp_path):
    """`flwr run` ships a FAB of at most 10 MB: a dataset's local copy in data/ (where the apps look for
    one), a user's JSONL or a checkpoint beside the project must not go in with the code."""
    import shutil
    import subprocess
    import sys
    import zipfile

    project = tmp_path / "project"
    keep = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("mops_core", "server", "client", "simulation", "docs", "tests"):
        shutil.copytree(launch_module.PROJECT / name, project / name, ignore=keep)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(launch_module.PROJECT / name, project / name)
    (project / "data" / "dolly").mkdir(parents=True)
    line = json.dumps({"instruction": "x" * 200, "context": "", "response": "y" * 200, "category": "open_qa"}) + "\n"
    (project / "data" / "dolly" / "databricks-dolly-15k.jsonl").write_text(line * 25_000)  # over 10 MB, as Dolly is
    (project / "my-tasks.jsonl").write_text(line)
    (project / "my-run" / "checkpoint").mkdir(parents=True)
    (project / "my-run" / "checkpoint" / "adapter_config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    built = subprocess.run([str(Path(sys.executable).parent / "flwr"), "build", "--app", str(project)], cwd=out,
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    [fab] = out.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert {"server/app.py", "client/app.py", "mops_core/model.py", "pyproject.toml"} <= set(names)
    assert not [n for n in names if n.startswith(("data/", "my-", "docs/", "tests/", "simulation/")) or n.endswith(".md")]


def test_a_launch_stops_its_own_superlink_and_leaves_another_on_the_same_home_running(monkeypatch, tmp_path, capsys):
    """A benchmark and a demo on one FLWR_HOME: ending one must not end the other's run."""
    home = tmp_path / "home"
    db = f"--database {home}/local-superlink/state.db"
    listed = {
        101: f"python flower-superlink --insecure --simulation --control-api-address 127.0.0.1:39617 --port 1 {db}",  # another run's
        102: f"python flower-superlink --insecure --simulation --control-api-address 127.0.0.1:41000 --port 2 {db}",  # this one's
        103: "python flower-superlink --control-api-address 127.0.0.1:41000 --database /elsewhere/local-superlink/state.db",
        104: "python flwr-simulation --runtime-api-address 127.0.0.1:41000",
    }
    monkeypatch.setattr(launch_module, "command_lines", lambda: iter(listed.items()))
    killed = []
    monkeypatch.setattr(launch_module, "stop_tree", lambda pid, grace: killed.append(pid))
    launch_module.stop_local_superlink(home, "41000")
    assert killed == [102]
    launch_module.stop_local_superlink(home, "4100")  # a port that only begins another's is not it
    assert killed == [102]
    # a launch onto a home another SuperLink runs on says so, and stops only its own afterwards
    monkeypatch.setattr(launch_module.subprocess, "run", lambda command, **kwargs: type("Done", (), {"returncode": 0})())
    launch_module.launch({}, supernodes=3, flwr_home=home, env={"FLWR_LOCAL_CONTROL_API_PORT": "41000"})
    assert "another local SuperLink (pid 101, 102) runs on" in capsys.readouterr().err
    assert killed == [102, 102]


def test_stopping_a_superlink_stops_what_it_started_even_what_ignores_sigterm():
    """A run stopped midway leaves SuperExec, the simulation and Ray in sessions of their own below the SuperLink."""
    import subprocess
    import time

    script = "trap '' TERM; sleep 60 & (trap '' TERM; sleep 60) & setsid sleep 60 & wait"
    parent = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len(family := launch_module.descendants(parent.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(family) >= 3
        started = time.monotonic()
        launch_module.stop_tree(parent.pid, grace=1.0)
        parent.wait(5)
        assert time.monotonic() - started < 5
        assert all(launch_module.zombie(pid) for pid in family), "a process below the SuperLink outlived its stop"
    finally:
        if parent.poll() is None:
            parent.kill()


def test_sigterm_unwinds_a_launch_as_ctrl_c_does_and_the_handler_is_restored_after():
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, launch_module.stopped_by_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode
    assert stopped.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before
