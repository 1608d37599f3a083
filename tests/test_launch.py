"""The README's main command fails loudly when Flower reports success but the ServerApp wrote nothing."""

import json

import simulation.launch as launch_module


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
