"""Tracking: what TensorBoard's own reader finds is what the run recorded; a resumed run repeats no step."""

import logging
import math
import sys

import pytest
from helpers import tensorboard_events

from mops_core.config import Settings, TrackingConfig
from mops_core.tracking import Tracker, open_tracker


def test_scalars_text_and_hparams_are_read_back_and_what_is_not_a_number_is_left_out(tmp_path):
    tracker = open_tracker(TrackingConfig(), tmp_path, name="run")
    for step in range(3):
        tracker.scalars({"test/perplexity": 10.0 - step, "clients/p10": None, "gate/entropy": math.nan, "n": step}, step)
    tracker.text("settings", "    lr = 0.001")
    tracker.close()
    events = tensorboard_events(tmp_path / "tensorboard")  # the default place: the run's own folder
    assert events["scalars"]["test/perplexity"] == [(0, 10.0), (1, 9.0), (2, 8.0)]
    assert events["scalars"]["n"] == [(0, 0.0), (1, 1.0), (2, 2.0)]
    assert "clients/p10" not in events["scalars"] and "gate/entropy" not in events["scalars"]
    assert events["tensors"] == ["settings/text_summary"]
    table = open_tracker(TrackingConfig(), tmp_path, name="run", first_step=None)  # None: the curves stay
    table.hparams({"method": "mops", "seed": 0, "alpha": 0.1, "tasks": ("a", "b")}, {"hparams/perplexity": 8.0, "hparams/rouge_l": None})
    table.close()
    events = tensorboard_events(tmp_path / "tensorboard")
    assert events["hparams"] == ["_hparams_/experiment", "_hparams_/session_end_info", "_hparams_/session_start_info"]
    assert events["scalars"]["test/perplexity"] == [(0, 10.0), (1, 9.0), (2, 8.0)] and events["scalars"]["hparams/perplexity"] == [(0, 8.0)]


def test_a_tracker_opened_with_the_settings_records_them_as_text_and_one_opened_without_does_not(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    open_tracker(TrackingConfig(), tmp_path / "with", name="run", config={"lr": 0.001, "tasks": ("a", "b")}).close()
    open_tracker(TrackingConfig(), tmp_path / "without", name="run").close()
    events = EventAccumulator(str(tmp_path / "with" / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    [written] = events.Tensors("settings/text_summary")
    assert written.tensor_proto.string_val[0].decode() == "    lr = 0.001\n    tasks = ('a', 'b')"
    assert tensorboard_events(tmp_path / "without" / "tensorboard")["tensors"] == []


def test_a_resumed_tracker_goes_on_without_repeating_the_steps_written_past_its_start(tmp_path):
    first = open_tracker(TrackingConfig(), tmp_path, name="run")
    for step in range(4):  # steps 2 and 3 written, then the run resumed from the checkpoint after step 1
        first.scalars({"loss": float(step)}, step)
    first.close()
    resumed = open_tracker(TrackingConfig(), tmp_path, name="run", first_step=2)
    for step in (2, 3, 4):
        resumed.scalars({"loss": 10.0 + step}, step)
    resumed.close()
    assert tensorboard_events(tmp_path / "tensorboard")["scalars"]["loss"] == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]


def test_tracking_none_writes_nothing_and_tracking_dir_chooses_the_place(tmp_path):
    tracker = open_tracker(TrackingConfig(tracking="none"), tmp_path, name="run")
    assert type(tracker) is Tracker
    tracker.scalars({"loss": 1.0}, 0)
    tracker.close()
    assert not list(tmp_path.iterdir())
    elsewhere = open_tracker(Settings.from_flat({"tracking-dir": str(tmp_path / "tb" / "mine")}).tracker, tmp_path / "out", name="run")
    elsewhere.scalars({"loss": 1.0}, 0)
    elsewhere.close()
    assert tensorboard_events(tmp_path / "tb" / "mine")["scalars"]["loss"] == [(0, 1.0)] and not (tmp_path / "out").exists()


def test_wandb_without_wandb_installed_says_so_in_one_line_and_tracks_nothing(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with caplog.at_level(logging.WARNING):
        tracker = open_tracker(TrackingConfig(tracking="wandb"), tmp_path, name="run")
    assert type(tracker) is Tracker and not list(tmp_path.iterdir())
    assert [r.getMessage() for r in caplog.records] == [
        "tracking = 'wandb', but wandb is not installed (pip install wandb): this run is not tracked"]


def test_wandb_logs_the_same_scalars_offline_where_it_is_installed(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = open_tracker(TrackingConfig(tracking="wandb"), tmp_path, name="run", config={"lr": 0.001}, first_step=1)
    tracker.scalars({"loss": 2.0, "none": None}, 0)  # before the resumed run's first step: on record already
    tracker.scalars({"loss": 1.0}, 1)
    tracker.close()
    assert wandb.run is None and list((tmp_path / "wandb").glob("**/offline-run-*"))
