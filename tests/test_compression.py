import copy
import json
import logging

import pytest
import torch
from helpers import tiny_settings

from mops_core.session import build_model
from mops_core.compression.int8 import Int8Linear
from mops_core.compression.layerwise import block_linears
from mops_core.compression.pipeline import CompressionCacheError, cache_dir, compress_base
from mops_core.compression.pruners import Pattern, magnitude_prune, sparsegpt_prune, wanda_prune
from mops_core.compression.spec import parse
from mops_core.train import make_optimizer, train_steps

PATTERNS = [Pattern(sparsity=0.5), Pattern(sparsity=0.75), Pattern(sparsity=0.9), Pattern(n=2, m=4), Pattern(n=3, m=4), Pattern(n=7, m=8)]


def layer_problem(rows=24, cols=64, tokens=512, seed=0):
    """A weight matrix and correlated inputs with uneven feature scales, as in real activations."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = (torch.randn(tokens, cols, generator=g) @ mix) * torch.logspace(-1, 1, cols)[torch.randperm(cols, generator=g)]
    return W, X


def all_pruned(W, X, pattern):
    H = X.T @ X
    return {
        "magnitude": magnitude_prune(W, pattern),
        "wanda": wanda_prune(W, torch.diag(H), pattern),
        "sparsegpt": sparsegpt_prune(W, H, pattern, blocksize=16),
    }


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.n}:{p.m}" if p.m else f"{p.sparsity}")
def test_sparsity_is_exact_and_n_of_every_m_are_zero(pattern):
    W, X = layer_problem()
    for name, pruned in all_pruned(W, X, pattern).items():
        zeros = pruned == 0
        if pattern.structured:
            per_group = zeros.reshape(W.shape[0], -1, pattern.m).sum(-1)
            assert (per_group == pattern.n).all(), name
        else:
            assert zeros.sum().item() == round(pattern.sparsity * W.numel()), name


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(sparsity=0.75), Pattern(n=2, m=4)], ids=str)
def test_sparsegpt_reconstructs_the_layer_output_best(pattern):
    W, X = layer_problem()
    errors = {name: torch.linalg.norm(X @ (W - P).T).item() for name, P in all_pruned(W, X, pattern).items()}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def obs_reference(W, H, pattern, blocksize, damp=0.01):
    """SparseGPT written plainly: column by column, the remaining Hessian inverted explicitly each time."""
    W = W.double().clone()
    H = H.double().clone()
    H += damp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    rows, cols = W.shape
    inv_diag = lambda j: torch.linalg.inv(H[j:, j:])[0, 0]  # noqa: E731 - [H_F^-1]_jj with F = columns j..end
    total = round(pattern.sparsity * W.numel())
    mask = torch.zeros_like(W, dtype=torch.bool)
    for j in range(cols):
        if pattern.structured and j % pattern.m == 0:
            d = torch.stack([inv_diag(c) for c in range(j, j + pattern.m)])
            scores = W[:, j : j + pattern.m] ** 2 / d  # OBS saliency w^2 / [H_F^-1]_jj
            for r in range(rows):
                mask[r, j + scores[r].argsort()[: pattern.n]] = True
        if not pattern.structured and j % blocksize == 0:
            end = min(j + blocksize, cols)
            d = torch.stack([inv_diag(c) for c in range(j, end)])
            scores = (W[:, j:end] ** 2 / d).flatten()
            k = (total * end) // cols - (total * j) // cols
            block = torch.zeros(scores.numel(), dtype=torch.bool)
            block[scores.argsort()[:k]] = True
            mask[:, j:end] = block.view(rows, end - j)
        inverse = torch.linalg.inv(H[j:, j:])
        error = torch.where(mask[:, j], W[:, j], torch.zeros_like(W[:, j])) / inverse[0, 0]
        W[:, j:] -= error.unsqueeze(1) * inverse[0].unsqueeze(0)
        W[mask[:, j], j] = 0.0
    return W


@pytest.mark.parametrize("pattern", [Pattern(sparsity=0.5), Pattern(n=2, m=4)], ids=str)
def test_sparsegpt_matches_a_plain_column_by_column_reference(pattern):
    W, X = layer_problem(rows=6, cols=16, tokens=64, seed=3)
    H = X.T @ X
    ours = sparsegpt_prune(W, H, pattern, blocksize=8).double()  # computes in float32
    reference = obs_reference(W, H, pattern, blocksize=8)
    assert torch.equal(ours == 0, reference == 0), "the same weights must be pruned"
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_sparsegpt_in_float64_does_not_depend_on_the_order_its_hessian_was_summed_in():
    """Threads (their number, the CPU) sum X X^T in different orders; SparseGPT's solve amplifies the difference."""
    g = torch.Generator().manual_seed(5)
    W = torch.randn(64, 128, generator=g)
    # Activations of a deep layer are strongly correlated: few directions, a little noise (H ill-conditioned).
    X = torch.randn(256, 16, generator=g) @ torch.randn(16, 128, generator=g) + 1e-2 * torch.randn(256, 128, generator=g)
    order = torch.randperm(X.shape[0], generator=g)

    def apart(dtype):
        Xd = X.to(dtype)
        H, H_other_order = Xd.T @ Xd, Xd[order].T @ Xd[order]
        assert not torch.equal(H, H_other_order)  # the same sum, rounded differently
        a, b = (sparsegpt_prune(W.double(), h, Pattern(sparsity=0.75)) for h in (H, H_other_order))
        return ((a != 0) != (b != 0)).sum().item(), (torch.linalg.norm(a - b) / torch.linalg.norm(a)).item()

    flips32, rel32 = apart(torch.float32)
    flips64, rel64 = apart(torch.float64)
    assert flips64 == 0 and rel64 < 1e-11, (flips64, rel64)
    assert rel32 > 1e3 * rel64 and rel32 > 1e-6, (flips32, rel32)  # what float64 buys: float32 rounding, amplified


def test_compression_spec_errors_are_specific():
    assert parse("sparsegpt:2:4").pattern == Pattern(n=2, m=4)
    assert parse("WANDA:0.75").pattern == Pattern(sparsity=0.75)
    for text, problem in [("sparsegpt", "needs a ratio"), ("gptq:0.5", "unknown method"), ("magnitude:1.5", "between 0 and 1"), ("sparsegpt:4:4", "0 < N < M")]:
        with pytest.raises(ValueError, match=problem):
            parse(text)


def compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path, compression="sparsegpt:0.5", **flat):
    settings = tiny_settings(**{
        "compression": compression, "data-dir": str(toy_data_dir), "model-cache-dir": str(tmp_path),
        "calibration-samples": 8, "calibration-length": 32, "sparsegpt-blocksize": 16, "samples": 140, **flat,
    })
    base = copy.deepcopy(pretrained_base)
    report = compress_base(base, tokenizer, settings, progress=False)
    return settings, base, report


def zero_masks(base):
    return {f"{i}.{n}": (lin.weight == 0).clone() for i, layer in enumerate(base.model.layers) for n, lin in block_linears(layer).items()}


@pytest.mark.parametrize("compression", ["sparsegpt:0.5", "wanda:2:4", "magnitude:0.75"])
def test_pruned_weights_stay_zero_through_training_and_the_cache(compression, pretrained_base, tokenizer, toy_data_dir, tmp_path):
    from helpers import toy_records

    from mops_core.data import TASKS, Formatter

    settings, base, report = compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path, compression)
    target = settings.compression.spec.pattern.ratio
    assert not report.from_cache and report.sparsity == pytest.approx(target, abs=1e-3)
    # Blocks pruned in float64 come back in the base's dtype, all they did not prune bit for bit.
    dense = dict(pretrained_base.named_parameters())
    for name, param in base.named_parameters():
        assert param.dtype == dense[name].dtype, name
        assert name.endswith("proj.weight") or torch.equal(param, dense[name]), name
    masks = zero_masks(base)
    model = build_model(settings, base, tokenizer)
    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"], 3))
    train_steps(model, examples, 5, make_optimizer(model.trainable_parameters(), 1e-2), pad_id=tokenizer.pad_token_id, progress=False)
    assert all(torch.equal(masks[k], v) for k, v in zero_masks(base).items())
    # A second run (another client, a later round) loads the very same weights from the cache.
    _, again, cached = compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path, compression)
    assert cached.from_cache and cached.sparsity == report.sparsity
    for (name, a), b in zip(base.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_corrupt_or_mismatched_cache_is_refused_by_name(pretrained_base, tokenizer, toy_data_dir, tmp_path):
    settings, base, _ = compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path)
    from mops_core.compression.pipeline import calibration_ids

    calibration = calibration_ids(settings, tokenizer, tokenizer.bos_token_id)
    path, _ = cache_dir(settings, __import__("mops_core.loading", fromlist=["x"]).base_fingerprint(pretrained_base), calibration)
    weights = path / "weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:1000])
    with pytest.raises(CompressionCacheError, match="weights.safetensors is corrupt"):
        compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path)
    from safetensors.torch import load_file, save_file

    weights.write_bytes(good)
    tensors = load_file(str(weights))
    tensors["model.layers.0.q_proj"][0, 0] += 1.0
    save_file(tensors, str(weights))
    with pytest.raises(CompressionCacheError, match="does not reproduce the compressed base"):
        compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path)
    weights.write_bytes(good)
    meta = json.loads((path / "compression.json").read_text())
    meta["determining"]["compression"]["sparsegpt_damp"] = 0.5
    (path / "compression.json").write_text(json.dumps(meta))
    with pytest.raises(CompressionCacheError, match="records another compression"):
        compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path)


def test_every_setting_that_decides_the_base_chooses_its_own_cached_base(tokenizer, toy_data_dir):
    from mops_core.compression.pipeline import calibration_ids
    from mops_core.config import Settings

    common = {"compression": "sparsegpt:0.5", "data-dir": str(toy_data_dir), "samples": 140, "max-length": 64}
    changes = {
        "compression": "wanda:0.5", "calibration-samples": 4, "calibration-length": 16, "sparsegpt-blocksize": 64,
        "sparsegpt-damp": 0.1, "prune-dtype": "float32", "samples": 100, "data-seed": 1, "model": "other",
    }
    paths = {"default": cache_dir(Settings.from_flat(common), "0" * 32, None)[0]}
    for key, value in changes.items():
        paths[key] = cache_dir(Settings.from_flat({**common, key: value}), "0" * 32, None)[0]
    others = [path for key, path in paths.items() if key != "model"]
    assert len(set(others)) == len(others), paths
    # `model` acts through the fingerprint of the base it loads, which the key holds.
    assert paths["model"] == paths["default"] != cache_dir(Settings.from_flat(common), "1" * 32, None)[0]
    # The calibration text, as the pruner sees it: other token ids (another reading of the same
    # settings' data) are another base.
    texts = [cache_dir(Settings.from_flat(common), "0" * 32, torch.full((2, 8), i))[0] for i in (1, 2)]
    assert len({*texts, paths["default"]}) == 3
    # The calibration settings shape what SparseGPT and Wanda see: calibration-samples x calibration-length tokens.
    ids = calibration_ids(Settings.from_flat({**common, "calibration-samples": 4, "calibration-length": 16}), tokenizer, 1)
    assert tuple(ids.shape) == (4, 16) and (ids[:, 0] == 1).all()


def test_int8_stays_close_to_fp32_and_passes_gradients_to_the_prompts(pretrained_base, tokenizer, toy_data_dir, tmp_path):
    settings, base, report = compressed(pretrained_base, tokenizer, toy_data_dir, tmp_path, "int8")
    assert "int8" in report.backend
    linears = [m for m in base.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 7 * base.config.num_hidden_layers and all(m.weight_int8.dtype == torch.int8 for m in linears)
    ids = torch.tensor([tokenizer("<|im_start|>user\nabc abd<|im_end|>", add_special_tokens=False).input_ids])
    with torch.no_grad():
        exact, quantised = pretrained_base(input_ids=ids).logits, base(input_ids=ids).logits
    assert (quantised - exact).abs().max() < 0.02 * exact.abs().max()
    model = build_model(settings, base, tokenizer)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "question_mask": torch.ones_like(ids, dtype=torch.bool)}
    labels = ids.clone()
    labels[:, :5] = -100
    model(**batch, labels=labels).loss.backward()
    assert model.prompts.grad is not None and model.prompts.grad.abs().sum() > 0


def test_int8_module_dequantises_to_within_half_a_step():
    linear = torch.nn.Linear(16, 8)
    q = Int8Linear(linear)
    step = linear.weight.abs().amax(1, keepdim=True) / 127
    assert ((q.dequantized(torch.float32) - linear.weight).abs() <= step / 2 + 1e-7).all()


def test_cli_compress_reports_sparsity_and_perplexity(tmp_path, tiny_model_dir, toy_data_dir, capsys):
    from mops_core.cli import main

    args = ["compress", "--model", str(tiny_model_dir), "--data-dir", str(toy_data_dir), "--model-cache-dir", str(tmp_path / "cache"),
            "--compression", "sparsegpt:2:4", "--calibration-samples", "8", "--calibration-length", "32", "--samples", "140",
            "--max-length", "64", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sparsity" in out and "overall sparsity 0.5000" in out
    written = json.loads((tmp_path / "compression.json").read_text())
    assert written["sparsity"] == pytest.approx(0.5) and written["perplexity_compressed"] != written["perplexity_dense"]
    assert main(args) == 0 and "from the cache" in capsys.readouterr().out


def test_an_exported_base_loads_on_another_machine_with_the_servers_fingerprint_and_is_not_compressed_again(
    tmp_path, tiny_model_dir, toy_data_dir, capsys, caplog
):
    from mops_core.cli import main
    from mops_core.compression.pipeline import EXPORT_FILE, prepare_base
    from mops_core.config import Settings
    from mops_core.loading import base_fingerprint

    common = ["--data-dir", str(toy_data_dir), "--calibration-samples", "8", "--calibration-length", "32", "--samples", "140",
              "--max-length", "64", "--no-progress", "--compression", "sparsegpt:2:4"]
    export = tmp_path / "exported"
    assert main(["compress", "--model", str(tiny_model_dir), "--model-cache-dir", str(tmp_path / "server"), *common,
                 "--export", str(export)]) == 0
    assert f'model = "{export}"' in capsys.readouterr().out
    flat = {"model": str(tiny_model_dir), "data-dir": str(toy_data_dir), "compression": "sparsegpt:2:4", "calibration-samples": 8,
            "calibration-length": 32, "samples": 140, "max-length": 64}
    server, _ = prepare_base(Settings.from_flat({**flat, "model-cache-dir": str(tmp_path / "server")}), progress=False)
    # The node: only the exported folder, an empty cache, no data (nothing to calibrate on) and the run's settings.
    node_flat = {**flat, "model": str(export), "model-cache-dir": str(tmp_path / "node"), "data-dir": str(tmp_path / "no-data")}
    with caplog.at_level(logging.WARNING):
        node, _ = prepare_base(Settings.from_flat(node_flat), progress=False)
    assert base_fingerprint(node) == base_fingerprint(server) and not caplog.text
    assert all(torch.equal(a, b) for a, b in zip(node.state_dict().values(), server.state_dict().values()))
    assert not (tmp_path / "node" / "compressed").exists()  # nothing compressed again
    node_none, _ = prepare_base(Settings.from_flat({**node_flat, "compression": "none"}), progress=False)
    assert base_fingerprint(node_none) == base_fingerprint(server) and "is used as it is" in caplog.text

    record = json.loads((export / EXPORT_FILE).read_text())
    (export / EXPORT_FILE).write_text(json.dumps({**record, "fingerprint": "0" * 32}))
    with pytest.raises(CompressionCacheError, match="does not reproduce the fingerprint"):
        prepare_base(Settings.from_flat(node_flat), progress=False)
    (export / EXPORT_FILE).write_text("{")
    with pytest.raises(CompressionCacheError, match="is corrupt"):
        prepare_base(Settings.from_flat(node_flat), progress=False)
    assert main(["compress", "--model", str(tiny_model_dir), *common[:-1], "int8", "--export", str(tmp_path / "x")]) == 2
    assert "int8 needs no export" in capsys.readouterr().out and not (tmp_path / "x").exists()
