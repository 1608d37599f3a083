"""The federated run's record: what it says about machines when a run resumes elsewhere, and the base it must resume on."""

from mops_core.config import Settings
from server.history import History

XEON = {"cpu": "Xeon", "cores": 2, "bf16_units": "amx", "gpu": None, "dtype": "bfloat16", "torch": "2.13.0"}
EPYC = {**XEON, "cpu": "EPYC", "bf16_units": None, "dtype": "float32"}


def test_the_machines_a_run_computed_on_are_listed_from_the_round_each_took_over(tmp_path):
    history = History(tmp_path, Settings())
    history.note_machine(1, EPYC)
    history.note_machine(4, EPYC)  # resumed on the same kind of machine: nothing to say
    assert history.info["machines"] == [{"from_round": 1, **EPYC}]
    history.note_machine(4, XEON)
    assert [m["from_round"] for m in history.info["machines"]] == [1, 4] and history.info["machines"][1]["cpu"] == "Xeon"
    # resumed again from round 2 (results ahead of the checkpoint): the rounds from 2 on are run again, here
    history.note_machine(2, XEON)
    assert history.info["machines"] == [{"from_round": 1, **EPYC}, {"from_round": 2, **XEON}]
    history.note_machine(1, EPYC)  # started over
    assert history.info["machines"] == [{"from_round": 1, **EPYC}]




def test_a_run_is_not_resumed_on_a_base_pruned_again_with_other_weights(tiny_model_dir, toy_data_dir, tmp_path):
    """Going on would tune another base: the run stops, says which bases and what to do, and changes nothing saved."""
    import json

    import pytest

    from mops_core import checkpoint
    from mops_core.session import Session
    from server.app import open_session
    from server.history import ResumeError, ResumePoint

    out = tmp_path / "run"
    settings = Settings.from_flat({
        "model": str(tiny_model_dir), "data-dir": str(toy_data_dir), "model-cache-dir": str(tmp_path / "cache"),
        "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16, "samples": 70, "max-length": 64,
        "out-dir": str(out), "resume": True,
    })
    session = Session.open(settings, progress=False)
    saved = checkpoint.save(out / "checkpoint", session.model, settings, session.tasks, {"round": 3})
    config = json.loads((saved / checkpoint.CONFIG_FILE).read_text())
    here = config["base_fingerprint"]
    # as if rounds 1-3 ran where the same recipe pruned the base to other weights
    (saved / checkpoint.CONFIG_FILE).write_text(json.dumps({**config, "base_fingerprint": "f6c1caa2" + "0" * 24}))
    files = {p: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(ResumeError, match=f"cannot resume {out} after round 3: .*fingerprint f6c1caa20{{24}}\\); the loaded "
                       f"base has fingerprint {here}. Load the base it was tuned on.* Or start it afresh"):
        open_session(settings, History(out, settings), ResumePoint(3, evaluated=True))
    assert {p: p.read_bytes() for p in saved.iterdir()} == files
    # on its own base it goes on
    (saved / checkpoint.CONFIG_FILE).write_text(json.dumps(config))
    resumed = open_session(settings, History(out, settings), ResumePoint(3, evaluated=True))
    for name, tensor in session.model.adapter_state_dict().items():
        assert (resumed.model.adapter_state_dict()[name] == tensor).all()
