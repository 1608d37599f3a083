import json

import pytest
import torch
from helpers import tiny_base, tiny_settings

from mops_core import checkpoint
from mops_core.checkpoint import CheckpointError
from mops_core.config import Settings
from mops_core.session import build_model


def trained_model(tokenizer, seed=0, **flat):
    settings = tiny_settings(**flat)
    model = build_model(settings, tiny_base(len(tokenizer), seed=seed), tokenizer)
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.normal_()
    return settings, model


@pytest.mark.parametrize("norm, statistics", [("rms", set()), ("standardise", {"gate.input_mean", "gate.input_scale"})])
def test_round_trip_restores_every_tensor_and_the_settings(tmp_path, tokenizer, norm, statistics):
    settings, model = trained_model(tokenizer, **{"gate-input-norm": norm})
    checkpoint.save(tmp_path / "ck", model, settings, ["a", "b", "c"], extra={"step": 7})
    ckpt = checkpoint.read(tmp_path / "ck")
    assert ckpt.settings == settings and ckpt.tasks == ["a", "b", "c"] and ckpt.config["step"] == 7
    _, fresh = trained_model(tokenizer, **{"gate-input-norm": norm})
    checkpoint.load_into(ckpt, fresh)
    for name, tensor in model.adapter_state_dict().items():
        torch.testing.assert_close(fresh.adapter_state_dict()[name], tensor, atol=0, rtol=0)
    gate = {"gate.fc1.weight", "gate.fc1.bias", "gate.fc2.weight", "gate.fc2.bias"}
    assert set(ckpt.tensors) == {"input_prompts", "prompts"} | gate | statistics


def test_corrupt_or_incomplete_checkpoints_are_refused(tmp_path, tokenizer):
    settings, model = trained_model(tokenizer)
    path = checkpoint.save(tmp_path / "ck", model, settings, [])
    weights = path / checkpoint.WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="adapter_model.safetensors is corrupt"):
        checkpoint.read(path)
    weights.write_bytes(data)
    (path / checkpoint.CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter_config.json is corrupt"):
        checkpoint.read(path)
    (path / checkpoint.CONFIG_FILE).unlink()
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        checkpoint.read(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.read(tmp_path / "nowhere")


def test_nan_is_never_saved_or_loaded(tmp_path, tokenizer):
    settings, model = trained_model(tokenizer)
    path = checkpoint.save(tmp_path / "ck", model, settings, [])
    model.prompts.data[0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="'prompts' holds NaN"):
        checkpoint.save(path, model, settings, [])
    checkpoint.read(path)  # the earlier checkpoint is untouched
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path / checkpoint.WEIGHTS_FILE))
    tensors["gate.fc1.bias"][0] = float("inf")
    save_file(tensors, str(path / checkpoint.WEIGHTS_FILE))
    with pytest.raises(CheckpointError, match="'gate.fc1.bias' holds NaN or inf"):
        checkpoint.read(path)


def test_another_base_or_shape_is_refused(tmp_path, tokenizer):
    settings, model = trained_model(tokenizer)
    path = checkpoint.save(tmp_path / "ck", model, settings, [])
    ckpt = checkpoint.read(path)
    _, other_base = trained_model(tokenizer, seed=5)
    before = {k: v.clone() for k, v in other_base.adapter_state_dict().items()}
    with pytest.raises(CheckpointError, match="tuned on another base .* fingerprint [0-9a-f]{32}\\); the loaded base has "
                       "fingerprint [0-9a-f]{32}. Load the base it was tuned on"):
        checkpoint.load_into(ckpt, other_base)
    for name, tensor in other_base.adapter_state_dict().items():  # refused before anything was copied
        torch.testing.assert_close(tensor, before[name], atol=0, rtol=0)
    _, other_shape = trained_model(tokenizer, experts=4)
    with pytest.raises(CheckpointError, match="'prompts' has shape \\(3, 2, 32\\), the model expects \\(4, 2, 32\\)"):
        checkpoint.load_into(ckpt, other_shape)
    _, baseline = trained_model(tokenizer, method="prompt")
    with pytest.raises(CheckpointError, match="unexpected gate.fc1.bias"):
        checkpoint.load_into(ckpt, baseline)
    before = {k: v.clone() for k, v in other_shape.adapter_state_dict().items()}
    for name, tensor in other_shape.adapter_state_dict().items():
        assert torch.equal(before[name], tensor), "a refused load must not change the model"


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path, tokenizer, monkeypatch):
    settings, model = trained_model(tokenizer)
    path = checkpoint.save(tmp_path / "ck", model, settings, [], extra={"step": 1})

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.atomic, "write_json", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(path, model, settings, [], extra={"step": 2})
    assert json.loads((path / checkpoint.CONFIG_FILE).read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"], "no temporary leftovers"


def test_a_checkpoint_with_settings_this_version_lacks_names_them_and_loads(tmp_path, caplog):
    from mops_core.checkpoint import Checkpoint

    settings = Settings.from_flat({"gate-floor": 0.05}).to_flat()
    written = {**{k: v for k, v in settings.items() if k != "gate-hidden"}, "gate-noise": 0.0}
    with caplog.at_level("WARNING"):
        loaded = Checkpoint(tmp_path, {"settings": written}, {}).settings
    assert "does not have: gate-noise" in caplog.text
    assert loaded.mops.gate_floor == 0.05 and loaded.mops.gate_hidden == Settings().mops.gate_hidden
