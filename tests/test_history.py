"""The federated run's record: what it says about machines and bases when a run resumes elsewhere."""

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


def test_a_base_compressed_again_is_recorded_once_per_resume_point(tmp_path):
    history = History(tmp_path, Settings())
    history.note_base_change(6, "a", "b")
    history.note_base_change(6, "a", "b")  # the same resume tried twice
    history.note_base_change(9, "b", "c")
    assert history.info["base_changes"] == [{"from_round": 6, "before": "a", "after": "b"},
                                            {"from_round": 9, "before": "b", "after": "c"}]
    history.note_base_change(7, "b", "d")  # rounds from 7 are run again: the change at 9 did not happen
    assert [c["from_round"] for c in history.info["base_changes"]] == [6, 7]
