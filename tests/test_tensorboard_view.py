"""What a researcher sees: a real TensorBoard server over runs written by the project's tracker lists
their tags and their hparams rows; with Chromium installed, a headless screenshot of the page is taken."""

import shutil
import sys
from pathlib import Path

import pytest

from mops_core.config import TrackingConfig
from mops_core.tracking import open_tracker
from server.history import round_scalars

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import tensorboard_view  # noqa: E402

pytestmark = pytest.mark.slow


def write_run(folder: Path, perplexities: list[float], method: str) -> None:
    tracker = open_tracker(TrackingConfig(), folder, name=folder.name)
    for number, ppl in enumerate(perplexities):
        row = {"round": number, "perplexity": ppl, "per_task": {"qa": ppl + 1}, "train_loss": None if number == 0 else 2.0,
               "client_eval": {"perplexity": ppl * 1.1, "p10": ppl, "p50": ppl * 1.1, "p90": ppl * 1.3}}
        tracker.scalars(round_scalars(row), step=number)
    tracker.hparams({"method": method}, {"hparams/perplexity": perplexities[-1]})
    tracker.close()


def test_tensorboard_serves_the_runs_tags_and_their_hparams_rows(tmp_path):
    write_run(tmp_path / "fedprompt", [12.0, 11.0, 10.5], "fedprompt")
    write_run(tmp_path / "mops", [12.0, 10.0, 9.0], "mops")
    with tensorboard_view.serve(tmp_path) as url:
        tags = tensorboard_view.scalar_tags(url, expect=2)
        assert set(tags) == {"fedprompt/tensorboard", "mops/tensorboard"}
        for found in tags.values():
            assert {"test/perplexity", "test/perplexity/qa", "clients/perplexity", "clients/p90", "train/loss"} <= set(found)
        assert tensorboard_view.hparams_runs(url) == ["fedprompt/tensorboard", "mops/tensorboard"]
        if shutil.which("chromium") or shutil.which("chromium-browser"):
            shot = tensorboard_view.screenshot(url, tmp_path / "scalars.png", tags="test/perplexity$", width=800, height=600)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
