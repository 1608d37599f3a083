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


def test_machine_names_the_cpu_its_bf16_units_and_the_dtype_a_run_resolves_to(monkeypatch):
    from mops_core import loading

    amx = "processor\t: 0\nmodel name\t: Intel Xeon Test\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
    monkeypatch.setattr(loading, "_cpuinfo", lambda: amx)
    described = loading.machine(ModelConfig(device="cpu", dtype="auto"))
    assert described["cpu"] == "Intel Xeon Test" and described["bf16_units"] == "amx" and described["dtype"] == "bfloat16"
    assert described["gpu"] is None and described["torch"] == torch.__version__ and described["cores"] >= 1
    assert loading.machine(ModelConfig(device="cpu", dtype="float32"))["dtype"] == "float32"  # a setting beats the hardware

    monkeypatch.setattr(loading, "_cpuinfo", lambda: amx.replace(" amx_bf16 amx_tile", ""))
    assert loading.machine(ModelConfig(device="cpu", dtype="auto"))["bf16_units"] == "avx512_bf16"
    monkeypatch.setattr(loading, "_cpuinfo", lambda: "model name\t: Old CPU\nflags\t\t: fpu avx2\n")
    described = loading.machine(ModelConfig(device="cpu", dtype="auto"))
    assert described["bf16_units"] is None and described["dtype"] == "float32"  # bfloat16 would be emulated: float32


def test_auto_picks_bfloat16_on_a_gpu_only_where_it_has_bfloat16_units(monkeypatch):
    """A V100 or T4 emulates bfloat16 (torch's `is_bf16_supported` says yes): float32 there. Asked of the run's GPU."""
    from types import SimpleNamespace

    from mops_core import loading

    majors = {0: 7, 1: 8, 2: 9}  # a V100 beside an A100 and an H100
    asked = []

    def properties(device):
        asked.append(device.index)
        return SimpleNamespace(major=majors[device.index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.version, "hip", None)
    auto = ModelConfig(dtype="auto")
    picked = [loading.resolve_dtype(auto, torch.device("cuda", i)) for i in (0, 1, 2)]
    assert picked == [torch.float32, torch.bfloat16, torch.bfloat16] and asked == [0, 1, 2]
    assert loading.resolve_dtype(ModelConfig(dtype="bfloat16"), torch.device("cuda", 0)) == torch.bfloat16  # a setting beats the hardware
    monkeypatch.setattr(torch.version, "hip", "6.4")  # on ROCm, as torch judges: every GPU able
    assert loading.resolve_dtype(auto, torch.device("cuda", 0)) == torch.bfloat16


def test_code_identity_follows_the_source_and_every_cached_result_is_keyed_by_its_code(tmp_path, monkeypatch, pretrained_base, tokenizer):
    import copy

    from helpers import tiny_settings

    from mops_core import activations, start_state
    from mops_core.compression import pipeline
    from mops_core.loading import code_identity
    from mops_core.session import build_model

    package = tmp_path / "numerics_pkg"
    (package / "kernels").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "kernels" / "softmax.py").write_text("SCALE = 1.0\n")
    (tmp_path / "single.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def fresh(*modules):
        code_identity.cache_clear()
        return code_identity(*modules)

    first = fresh("numerics_pkg", "single")
    assert fresh("single", "numerics_pkg") == first and len(first) == 16
    (package / "kernels" / "softmax.py").write_text("SCALE = 2.0\n")  # a package's every file counts, nested ones too
    second = fresh("numerics_pkg", "single")
    (tmp_path / "single.py").write_text("X = 2\n")
    assert len({first, second, fresh("numerics_pkg", "single")}) == 3
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        fresh("no_such_module")

    # Each cache takes its key from its own modules: pointed at numerics_pkg, an edit there moves every key.
    settings = tiny_settings()
    model = build_model(settings, copy.deepcopy(pretrained_base), tokenizer)
    cache = activations.ActivationCache(model, "tok", directory=None, memory_mb=1, disk_mb=0)
    for module in (start_state, pipeline, activations):
        monkeypatch.setattr(module, "_CODE", ("numerics_pkg",))

    def keys():
        code_identity.cache_clear()
        return start_state.start_state_key(settings, model), pipeline.cache_dir(settings, "0" * 32, None)[0], cache.identity(model)

    before = keys()
    assert keys() == before
    (package / "kernels" / "softmax.py").write_text("SCALE = 3.0\n")
    after = keys()
    assert all(a != b for a, b in zip(before, after)), "a result computed by other code must not be reused"
    code_identity.cache_clear()
