import pytest
import torch

from mops_core.config import ModelConfig
from mops_core.loading import ModelLoadError, base_fingerprint, load_base, resolve_source


def test_missing_or_wrong_model_locations_are_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base(ModelConfig(model=str(tmp_path / "no" / "such" / "model")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_base(ModelConfig(model=str(tmp_path / "empty")))
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"


def test_local_directory_loads_frozen_on_the_requested_dtype(tiny_model_dir):
    model, tokenizer = load_base(ModelConfig(model=str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template and tokenizer.bos_token_id == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_asking_for_cuda_without_it_names_the_setting(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="setting 'device' is 'cuda'"):
        load_base(ModelConfig(model=str(tiny_model_dir), device="cuda"))


def test_fingerprint_ignores_dtype_but_sees_pruning(tiny_model_dir):
    fp32, _ = load_base(ModelConfig(model=str(tiny_model_dir)))
    bf16, _ = load_base(ModelConfig(model=str(tiny_model_dir), dtype="bfloat16"))
    assert base_fingerprint(fp32) == base_fingerprint(bf16)
    with torch.no_grad():
        fp32.model.layers[0].mlp.up_proj.weight[:, ::2] = 0.0  # half the weights of one matrix pruned
    assert base_fingerprint(fp32) != base_fingerprint(bf16)
