"""Each remedy of the gate and the prompts changes what it claims to, on tiny models: what each is for, shown."""

import dataclasses
import math
import random

import pytest
import torch
from helpers import tiny_base
from test_model import QLENS, TEXTS, batch_of, make_model

from mops_core.config import MoPsConfig, Settings, TrainConfig
from mops_core.model import MoPsModel
from mops_core.parsing import SettingsError
from mops_core.train import GateRegulariser, fit_gate, gate_features, make_mops_optimizer, pretrain_gate, train_steps


def with_cfg(model: MoPsModel, **changes) -> MoPsModel:
    model.cfg = dataclasses.replace(model.cfg, **changes)
    return model


def entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


@torch.no_grad()
def test_the_floor_shapes_the_scores_exactly(tokenizer):
    model = make_model(tokenizer)
    logits = torch.randn(5, 3) * 3
    torch.testing.assert_close(model.gate.log_scores(logits).exp(), torch.softmax(logits, -1))
    model.gate.floor = 0.1
    floored = model.gate.log_scores(logits).exp()
    torch.testing.assert_close(floored, 0.1 + 0.7 * torch.softmax(logits, -1))
    assert (floored >= 0.1 - 1e-7).all() and torch.allclose(floored.sum(-1), torch.ones(5))


@torch.no_grad()
def test_gate_inputs_read_what_they_say(tokenizer):
    model = with_cfg(make_model(tokenizer), gate_input="prompts+question")
    batch = batch_of(tokenizer, TEXTS, QLENS)
    hidden = model.entering(batch["input_ids"], batch["attention_mask"])
    k = model.num_prompts
    for i, q in enumerate(QLENS):
        question = hidden[i, 1 + k : 1 + k + q]
        prompts = hidden[i, 1 : 1 + k]
        torch.testing.assert_close(model.gate_input(hidden, batch["question_mask"])[i], torch.cat([prompts, question]).mean(0))
        with_cfg(model, gate_input="question")
        torch.testing.assert_close(model.gate_input(hidden, batch["question_mask"])[i], question.mean(0))
        with_cfg(model, gate_input="last")
        torch.testing.assert_close(model.gate_input(hidden, batch["question_mask"])[i], question[-1])
        with_cfg(model, gate_input="prompts+question")


def collapsed_model(tokenizer) -> MoPsModel:
    model = make_model(tokenizer)
    with torch.no_grad():
        model.gate.fc2.weight.zero_()
        model.gate.fc2.bias.copy_(torch.tensor([4.0, 0.0, 0.0]))  # nearly everything to expert 0
    return model


def train_gate(model, tokenizer, regulariser, steps=30):
    from helpers import toy_records

    from mops_core.data import TASKS, Formatter

    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:3], 4))
    optimizer = torch.optim.AdamW(model.gate.parameters(), lr=3e-3)
    train_steps(model, examples, steps, optimizer, pad_id=tokenizer.pad_token_id, batch_size=2, progress=False, regulariser=regulariser)
    with torch.no_grad():
        from mops_core.data import collate

        gate = model(**collate(examples, tokenizer.pad_token_id)).gate
    return entropy(gate.mean(0)).item(), entropy(gate).mean().item()


def test_balance_term_spreads_a_collapsed_gate_over_the_experts(tokenizer):
    share_plain, _ = train_gate(collapsed_model(tokenizer), tokenizer, None)
    share_balanced, _ = train_gate(collapsed_model(tokenizer), tokenizer, GateRegulariser(balance=1.0))
    assert share_balanced > share_plain + 0.2, (share_plain, share_balanced)
    assert share_balanced > 0.8 * math.log(3)


def test_automatic_prompt_lr_follows_the_prompts_scale(tokenizer):
    model = make_model(tokenizer)
    model.init_prompts_from_input()
    rms = model.prompts.detach().pow(2).mean().sqrt().item()  # the prompts start as their hidden states
    optimizer = make_mops_optimizer(model, TrainConfig(lr=1e-3))
    assert optimizer.param_groups[0]["params"] == [model.prompts]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * rms, rel=1e-5)
    assert optimizer.param_groups[1]["lr"] == 1e-3 and len(optimizer.param_groups[1]["params"]) == 4
    fixed = make_mops_optimizer(model, TrainConfig(lr=1e-3, prompt_lr=5e-3))
    assert fixed.param_groups[0]["lr"] == 5e-3


def test_gate_lr_scale_slows_or_fixes_the_gate_while_the_prompts_train(tokenizer):
    from helpers import toy_records

    from mops_core.data import TASKS, Formatter

    model = make_model(tokenizer)
    half = make_mops_optimizer(model, TrainConfig(lr=1e-3, gate_lr_scale=0.5))
    assert half.param_groups[1]["lr"] == pytest.approx(5e-4)
    gate_before = {k: v.clone() for k, v in model.gate.state_dict().items()}
    prompts_before = model.prompts.detach().clone()
    fixed = make_mops_optimizer(model, TrainConfig(lr=1e-2, gate_lr_scale=0.0))
    assert len(fixed.param_groups) == 1
    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:3], 2))
    train_steps(model, examples, 3, fixed, pad_id=tokenizer.pad_token_id, batch_size=2, progress=False)
    for key, value in model.gate.state_dict().items():
        assert torch.equal(value, gate_before[key]), key
    assert not torch.equal(model.prompts.detach(), prompts_before)


def test_the_balance_term_trains_the_gate_but_the_recorded_loss_is_the_language_model_loss(tokenizer):
    from helpers import toy_records

    from mops_core.data import TASKS, Formatter, collate

    assert GateRegulariser.from_config(TrainConfig()) is None, "off by default"
    gate = torch.tensor([[0.9, 0.05, 0.05]], requires_grad=True)
    torch.testing.assert_close(GateRegulariser(balance=1.0)(gate), (gate * (gate * 3).log()).sum())  # KL(mean || uniform)

    example = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:1], 1))
    models = {}
    for name, regulariser in (("plain", None), ("balanced", GateRegulariser(balance=10.0))):
        model = collapsed_model(tokenizer)
        with torch.no_grad():
            language_model_loss = model(**collate(example, tokenizer.pad_token_id)).loss.item()
        optimizer = torch.optim.AdamW(model.gate.parameters(), lr=1e-2)
        stats = train_steps(model, example, 1, optimizer, pad_id=tokenizer.pad_token_id, progress=False, regulariser=regulariser)
        assert stats.losses[0] == pytest.approx(language_model_loss, rel=1e-6), name
        models[name] = model
    moved = [not torch.equal(a, b) for a, b in zip(models["plain"].gate.parameters(), models["balanced"].gate.parameters())]
    assert any(moved), "the balance term must change what the gate learns"


@pytest.mark.parametrize(
    "key, value, words",
    [("gate-floor", 1.0, "1/experts"), ("gate-balance", -0.1, "0 or more"), ("gate-lr-scale", -1.0, "0 or more"), ("gate-input", "mean", "gate-input")],
)
def test_impossible_remedy_settings_name_the_key(key, value, words):
    with pytest.raises(SettingsError, match=key.replace("-", "[-_]")) as info:
        Settings.from_flat({key: value})
    assert words.replace("-", "_") in str(info.value).replace("-", "_")


def test_defaults_keep_the_sink_out_of_the_gate_with_every_remedy(tokenizer):
    base = tiny_base(len(tokenizer))
    cfg = MoPsConfig(experts=3, prompts_per_expert=2, inject_layer=2, gate_hidden=16, gate_floor=0.1)
    model = MoPsModel(base, cfg, sink_token_id=tokenizer.bos_token_id)
    log_g = model.gate.log_scores(torch.randn(2, 3))
    bias = model.gate_bias(log_g, 20)[:, 0, 0]
    assert (bias[:, 0] == 0).all() and (bias[:, 7:] == 0).all()
    torch.testing.assert_close(bias[:, 1:7], (log_g + math.log(3)).repeat_interleave(2, 1))  # E g, E = 3


@torch.no_grad()
@pytest.mark.parametrize("gating", ["attention", "hidden"])
def test_scaled_gate_at_uniform_is_the_ungated_baseline(tokenizer, gating):
    """gate-scale = experts: E g = 1 for a uniform gate, so MoPs starts exactly where the baseline is."""
    batch = batch_of(tokenizer, TEXTS, QLENS)
    scaled = make_model(tokenizer, gating=gating)
    assert scaled.gate.gain == 3.0  # gate-scale = experts, the default
    scaled.gate.fc2.weight.zero_()
    scaled.gate.fc2.bias.zero_()
    baseline = make_model(tokenizer, gating=gating, method="prompt")
    baseline.load_state_dict({k: v for k, v in scaled.state_dict().items() if not k.startswith("gate.")})
    expected = baseline(**batch, return_logits=True).logits
    torch.testing.assert_close(scaled(**batch, return_logits=True).logits, expected, atol=1e-5, rtol=1e-5)
    scaled.gate.gain = 1.0  # gate-scale = one, the paper's g
    assert not torch.allclose(scaled(**batch, return_logits=True).logits, expected, atol=1e-3)


def gate_model(tokenizer, norm: str) -> MoPsModel:
    cfg = MoPsConfig(experts=3, prompts_per_expert=2, inject_layer=2, gate_hidden=16, gate_input_norm=norm)
    return MoPsModel(tiny_base(len(tokenizer)), cfg, sink_token_id=tokenizer.bos_token_id)


def signal_beside_a_huge_dimension(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate inputs whose task shows in dimensions 1-3 while dimension 0, like an LLM's massive
    activations, is hundreds of times larger and says nothing about the task."""
    generator = torch.Generator().manual_seed(seed)
    tasks = torch.randint(0, 3, (n,), generator=generator)
    feats = torch.randn(n, 32, generator=generator)
    feats[torch.arange(n), 1 + tasks] += 4.0
    feats[:, 0] = 300 + 100 * torch.randn(n, generator=generator)
    return feats, tasks


def test_a_standardised_gate_routes_a_task_signal_that_rms_drowns(tokenizer):
    train, train_tasks = signal_beside_a_huge_dimension(256, seed=0)
    test, test_tasks = signal_beside_a_huge_dimension(256, seed=1)
    accuracy = {}
    for norm in ("rms", "standardise"):
        model = gate_model(tokenizer, norm)
        model.gate.fit_input_statistics(train)
        fit_gate(model, train, train_tasks, steps=500, lr=1e-3, seed=0)
        with torch.no_grad():
            accuracy[norm] = (model.gate.logits(test).argmax(-1) == test_tasks).float().mean().item()
    assert accuracy["standardise"] > 0.95 and accuracy["rms"] < 0.6, accuracy


@torch.no_grad()
def test_a_standardised_gate_sees_the_same_input_whatever_each_dimensions_unit(tokenizer):
    feats, _ = signal_beside_a_huge_dimension(64, seed=0)
    scale, shift = torch.logspace(-3, 3, 32), torch.linspace(-50, 50, 32)
    model = gate_model(tokenizer, "standardise")
    model.gate.fc2.weight.normal_()
    model.gate.fit_input_statistics(feats)
    logits = model.gate.logits(feats)
    model.gate.fit_input_statistics(feats * scale + shift)
    torch.testing.assert_close(model.gate.logits(feats * scale + shift), logits, atol=2e-3, rtol=0)  # float32 rounding
    model.gate.input_mean.zero_()  # what 'none' would see: another input altogether
    assert not torch.allclose(model.gate.logits(feats * scale + shift), logits, atol=0.1)


def test_the_input_statistics_travel_with_the_gate_and_are_never_trained(tokenizer):
    model = gate_model(tokenizer, "standardise")
    statistics = {"gate.input_mean", "gate.input_scale"}
    assert statistics <= set(model.federated_state_dict())
    assert all(p is not model.gate.input_mean and p is not model.gate.input_scale for p in model.trainable_parameters())
    assert not statistics & set(gate_model(tokenizer, "rms").adapter_state_dict())
    with pytest.raises(ValueError, match="at least 2 finite"):
        model.gate.fit_input_statistics(torch.full((4, 32), math.nan))
    assert torch.equal(model.gate.input_scale, torch.ones(32)), "a refused fit leaves the statistics alone"


def test_gate_pretraining_fits_the_statistics_even_when_it_skips_the_fit(tokenizer):
    from helpers import toy_records

    from mops_core.data import TASKS, Formatter

    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:3], 4))
    for steps in (0, 5):
        model = gate_model(tokenizer, "standardise")
        fc1 = model.gate.fc1.weight.detach().clone()
        cfg = TrainConfig(gate_pretrain_steps=steps, gate_pretrain_samples=8, seed=0)
        accuracy = pretrain_gate(model, examples, cfg, pad_id=tokenizer.pad_token_id, progress=False)
        feats = gate_features(model, random.Random(0).sample(examples, 8), pad_id=tokenizer.pad_token_id)
        torch.testing.assert_close(model.gate.input_mean, feats.mean(0))
        torch.testing.assert_close(model.gate.input_scale, feats.std(0))
        assert (accuracy is None) == (steps == 0) and torch.equal(model.gate.fc1.weight, fc1) == (steps == 0)


def test_gate_pretraining_lr_sets_how_far_the_gate_moves(tokenizer):
    from helpers import toy_records

    from mops_core.data import TASKS, Formatter

    examples = Formatter(tokenizer, 64, TASKS["dolly"]).examples(toy_records(TASKS["dolly"][:3], 4))
    moved = {}
    for lr in (1e-4, 1e-2):
        model = gate_model(tokenizer, "rms")
        start = model.gate.fc1.weight.detach().clone()
        pretrain_gate(model, examples, TrainConfig(gate_pretrain_steps=5, gate_pretrain_samples=8, gate_pretrain_lr=lr), pad_id=0, progress=False)
        moved[lr] = (model.gate.fc1.weight - start).abs().max().item()
    # Adam moves each weight by about lr per step: 5 steps, at most 5 lr.
    assert moved[1e-4] <= 5e-4 * 1.01 and moved[1e-2] > 10 * moved[1e-4], moved
