"""The decoder layers through torch.compile: the same numbers as eager, and eager with the reason logged where compiling fails."""

import logging

import pytest
import torch
from helpers import tiny_base, tiny_settings
from test_attention import gradients, inputs, written_out
from test_model import QLENS, TEXTS, batch_of, make_model

from mops_core import attention, compiled
from mops_core.attention import written_out_attention
from mops_core.compiled import labelled_nll
from mops_core.config import Settings
from mops_core.session import build_model


@pytest.fixture
def compiling(monkeypatch, tmp_path):
    """torch.compile on (the tests' conftest turns it off), a fresh compiled function, inductor's cache in tmp_path."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_unavailable", None)
    monkeypatch.setattr(compiled, "_first_pass_reported", False)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(disable=False):  # config modules are patched with their own context managers
        yield
    torch._dynamo.reset()


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_written_out_attention_equals_the_reference():
    """What the compiled layers attend with: values and gradients as attention written out in the test."""
    q, k, v, bias = inputs(torch.float32)
    ours, theirs = written_out_attention(q, k, v, bias, 0.25), written_out(q, k, v, bias, 0.25)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-6)
    for a, b in zip(gradients(ours, (q, k, v, bias)), gradients(theirs, (q, k, v, bias))):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def has_cpp_compiler() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not has_cpp_compiler(), reason="inductor needs a C++ compiler on CPU (the fallback test covers its absence)")
def test_compiled_layers_give_the_eager_numbers(tokenizer, compiling, caplog, monkeypatch):
    """Loss and every trainable gradient within 1e-5 of eager in float32, evaluation too; the compiled graph really ran,
    attending through the written-out attention with and without autograd, and the loss was compiled too."""
    traced = []  # autograd's state each time the compiled layers' attention is traced
    losses = []  # whether the loss ran compiled, each time

    def spy(*args):
        traced.append(torch.is_grad_enabled())
        return written_out_attention(*args)

    def loss_spy(*args):
        losses.append(torch.compiler.is_compiling())
        return labelled_nll(*args)

    monkeypatch.setattr(attention, "written_out_attention", spy)
    monkeypatch.setattr(compiled, "labelled_nll", loss_spy)
    model = make_model(tokenizer)
    batch = batch_of(tokenizer, TEXTS, QLENS)
    eager_loss, eager_grads = loss_and_grads(model, batch)
    with torch.no_grad():
        eager_eval = model(**batch, return_logits=True).logits

    model.compile_layers = True
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with caplog.at_level(logging.INFO, logger="mops_core.compiled"):
        loss, grads = loss_and_grads(model, batch)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    assert compiled.unavailable_reason() is None
    assert "decoder layers compiled" in caplog.text and "first pass took" in caplog.text
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch, return_logits=True).logits, eager_eval, atol=1e-5, rtol=1e-5)
    assert set(traced) == {True, False}
    assert set(losses) == {False, True}  # eager first, then compiled


@pytest.mark.slow
def test_without_a_compiler_the_layers_run_eager_and_the_log_says_why(tokenizer, compiling, caplog):
    model = make_model(tokenizer, layers=3, inject=1)
    batch = batch_of(tokenizer, TEXTS, QLENS)
    eager_loss, _ = loss_and_grads(model, batch)
    model.compile_layers = True
    no_compiler = {"cpp.cxx": (None, "no-such-c++-compiler"), "fx_graph_cache": False}
    with torch._inductor.config.patch(no_compiler), caplog.at_level(logging.WARNING, logger="mops_core.compiled"):
        loss, _ = loss_and_grads(model, batch)
    assert "No working C++ compiler" in compiled.unavailable_reason()
    assert "torch.compile cannot run here" in caplog.text and "no-such-c++-compiler" in caplog.text
    torch.testing.assert_close(loss, eager_loss)
    caplog.clear()
    loss_and_grads(model, batch)  # the process stays eager without trying again
    assert caplog.text == ""


def test_compile_is_a_setting_the_model_follows(tokenizer):
    assert Settings().model.compile is True
    for wanted in (True, False):
        assert build_model(tiny_settings(compile=wanted), tiny_base(len(tokenizer)), tokenizer).compile_layers is wanted
    assert compiled.unavailable_reason() == "TORCH_COMPILE_DISABLE is set"  # as conftest.py asks


def test_pytorchs_own_deprecation_met_while_compiling_stays_quiet_where_flower_shows_them(compiling):
    """Flower shows every DeprecationWarning once per process; inductor's import of torch.utils.mkldnn
    raised PyTorch's own about `torch.jit.script_method` in every simulated client. Others still show."""
    import importlib
    import warnings

    import torch.utils.mkldnn

    with warnings.catch_warnings(record=True) as seen:
        warnings.filterwarnings("once", category=DeprecationWarning)  # as flwr.simulation.ray_transport.utils sets
        compiled._compiled_version(labelled_nll)
        importlib.reload(torch.utils.mkldnn)  # what inductor imports on its first compile on a CPU
        warnings.warn("a deprecation of ours", DeprecationWarning)
    assert [str(w.message) for w in seen] == ["a deprecation of ours"]
