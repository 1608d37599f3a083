import copy
import json
import logging
import os
import time

import pytest
import torch
from helpers import tiny_settings, toy_records

from mops_core import start_state
from mops_core.cli import main
from mops_core.data import TASKS, Formatter, PreparedData, collate, sample_and_split
from mops_core.evaluate import evaluate
from mops_core.session import Session, build_model
from mops_core.train import TrainingError, init_input_prompts, make_optimizer, train_steps

TASKS3 = TASKS["dolly"][:3]


def toy_data(tokenizer, settings):
    train, test = sample_and_split(toy_records(TASKS3, 60), settings.data)
    formatter = Formatter(tokenizer, settings.data.max_length, TASKS3)
    return PreparedData(TASKS3, train, test, formatter.examples(train), formatter.examples(test))


def session_on(settings, base, tokenizer, data):
    """A session on this base and these in-memory data, without an activation cache."""
    session = Session(settings, base, tokenizer, build_model(settings, base, tokenizer), cache=None, tasks=data.tasks)
    session.data = data
    return session


def start_from(settings, base, tokenizer, data):
    """A session on these in-memory data, brought to its start state; returns its model and the report."""
    session = session_on(settings, base, tokenizer, data)
    return session.model, start_state.prepare(session, progress=False)


@pytest.mark.parametrize("method", ["mops", "prompt"])
def test_short_training_fits_the_examples_it_trains_on(tokenizer, pretrained_base, method):
    """Five passes over 12 examples lower their perplexity by 4-6% here (both methods, seeds 0 and 1);
    the base stays frozen. On held-out examples 60 steps move the toy task by only 0.5-1.6%, too
    little to tell learning from numerical drift between installs, so that is the benchmarks' job."""
    settings = tiny_settings(method=method, samples=180, lr=3e-2, steps=60, **{"gate-pretrain-steps": 100})
    data = toy_data(tokenizer, settings)
    few = data.train[:12]
    model, _ = start_from(settings, copy.deepcopy(pretrained_base), tokenizer, data)
    before = evaluate(model, few, data.tasks, pad_id=tokenizer.pad_token_id, progress=False)
    base_before = {k: v.clone() for k, v in model.base.state_dict().items()}
    optimizer = make_optimizer(model.trainable_parameters(), settings.train.lr)
    stats = train_steps(model, few, 60, optimizer, pad_id=tokenizer.pad_token_id, progress=False)
    after = evaluate(model, few, data.tasks, pad_id=tokenizer.pad_token_id, progress=False)
    assert stats.steps == 60 and stats.examples == 60
    assert after.perplexity < 0.97 * before.perplexity, (before.perplexity, after.perplexity)
    assert all(torch.equal(base_before[k], v) for k, v in model.base.state_dict().items()), "the base must stay frozen"


def test_gate_pretraining_routes_held_out_instructions_by_task(tokenizer, pretrained_base):
    settings = tiny_settings(samples=180, **{"gate-pretrain-steps": 100})
    data = toy_data(tokenizer, settings)
    model, start = start_from(settings, copy.deepcopy(pretrained_base), tokenizer, data)
    held_out = evaluate(model, data.test, data.tasks, pad_id=tokenizer.pad_token_id, progress=False)
    assert start.gate_train_accuracy > 0.9
    assert held_out.routing_accuracy > 0.9
    diagonal = [held_out.gate_matrix[i][i] for i in range(3)]
    assert min(diagonal) > 0.5, held_out.gate_matrix

    # Per task, against the gate scored on the questions alone (the gate-pretraining path, no forward pass).
    from mops_core.train import gate_features

    with torch.no_grad():
        scores = model.gate(gate_features(model, data.test, pad_id=tokenizer.pad_token_id)).exp()
    task_ids = torch.tensor([ex.task_id for ex in data.test])
    for i, task in enumerate(data.tasks):
        mine = scores[task_ids == i]
        score = held_out.per_task[task]
        assert score.routing_accuracy == pytest.approx((mine.argmax(-1) == i).double().mean().item(), abs=1e-9)
        assert score.gate_entropy == pytest.approx(-(mine * mine.log()).sum(-1).mean().item(), rel=1e-4)
    weights = [held_out.per_task[t].samples for t in data.tasks]
    overall = sum(w * held_out.per_task[t].routing_accuracy for w, t in zip(weights, data.tasks)) / sum(weights)
    assert overall == pytest.approx(held_out.routing_accuracy)


def test_input_prompt_pretraining_moves_p1_only_and_prompts_start_from_it(tokenizer, pretrained_base):
    settings = tiny_settings(samples=60, **{"input-prompt-steps": 5, "input-prompt-lr": 1e-2})
    data = toy_data(tokenizer, settings)
    model = build_model(settings, copy.deepcopy(pretrained_base), tokenizer)
    init_input_prompts(model, torch.Generator().manual_seed(0))
    sampled = model.input_prompts.detach().clone()
    gate_before = copy.deepcopy(model.gate.state_dict())
    from mops_core.train import pretrain_input_prompts

    pretrain_input_prompts(model, data.train, settings.train, pad_id=tokenizer.pad_token_id, progress=False)
    assert not torch.equal(model.input_prompts, sampled) and not model.input_prompts.requires_grad
    assert all(torch.equal(v, model.gate.state_dict()[k]) for k, v in gate_before.items())
    torch.testing.assert_close(model.prompts.reshape(-1, model.width), model.prompt_states())


def test_text_init_starts_p1_as_the_texts_token_embeddings_repeated_and_keys_its_own_start_state(tokenizer, pretrained_base):
    from mops_core.start_state import start_state_key

    text = "ab c"
    vocab = tiny_settings(**{"input-prompt-init": "vocab"})
    texted = tiny_settings(**{"input-prompt-init": "text", "input-prompt-text": text})
    model = build_model(texted, copy.deepcopy(pretrained_base), tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 1 < len(ids) < model.num_prompts  # so that the text must repeat
    expected = [ids[i % len(ids)] for i in range(model.num_prompts)]
    embeddings = model.base.model.embed_tokens.weight
    torch.testing.assert_close(model.input_prompts, embeddings[torch.tensor(expected)].float())
    sampled = build_model(vocab, copy.deepcopy(pretrained_base), tokenizer).input_prompts
    assert not torch.equal(sampled, model.input_prompts)
    keys = {start_state_key(s, model) for s in (vocab, texted, texted.replace(input_prompt_text="Be brief."))}
    assert len(keys) == 3, "a start state made from another P1 init must not be reused"
    # The same settings (dtype "auto") on a machine whose base runs in bfloat16: another start state.
    model.base.to(torch.bfloat16)
    assert start_state_key(texted, model) not in keys


def test_divergence_stops_with_the_step_named(tokenizer, pretrained_base):
    settings = tiny_settings(samples=60)
    data = toy_data(tokenizer, settings)
    model = build_model(settings, copy.deepcopy(pretrained_base), tokenizer)
    with torch.no_grad():
        model.prompts.fill_(float("nan"))
    optimizer = make_optimizer(model.trainable_parameters(), 1e-3)
    with pytest.raises(TrainingError, match="loss became nan at step 1"):
        train_steps(model, data.train, 3, optimizer, pad_id=tokenizer.pad_token_id, progress=False)


def test_cli_train_then_eval_end_to_end(tmp_path, tiny_model_dir, toy_data_dir, caplog):
    out = tmp_path / "run"
    stale = tmp_path / "cache" / "compressed" / "sparsegpt-0.75-old"  # what an earlier version left behind
    stale.mkdir(parents=True)
    with open(stale / "weights.safetensors", "wb") as fh:
        fh.truncate(2**30)  # sparse: a GiB on paper, nothing on disk
    os.utime(stale, (time.time() - 40 * 86400,) * 2)
    common = ["--model", str(tiny_model_dir), "--data-dir", str(toy_data_dir), "--no-progress", "--model-cache-dir", str(tmp_path / "cache")]
    shape = ["--experts", "7", "--prompts-per-expert", "2", "--inject-layer", "2", "--max-length", "64", "--samples", "140"]
    with caplog.at_level(logging.INFO):
        code = main(["train", *common, *shape, "--steps", "5", "--gate-pretrain-steps", "10", "--out", str(out)])
    assert code == 0
    assert "1.0 GiB that no run has used for 30 days; `mops cache prune --unused-days 30`" in caplog.text
    results = json.loads((out / "results.json").read_text())
    assert results["train"]["steps"] == 5 and len(results["train"]["losses"]) == 5
    for name in ("loss.png", "gate_heatmap.png", "checkpoint/adapter_model.safetensors", "checkpoint/adapter_config.json"):
        assert (out / name).exists(), name
    assert main(["eval", str(out), "--no-progress"]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["perplexity"] == pytest.approx(results["after"]["perplexity"], rel=1e-6)
    assert len(evaluated["gate_matrix"]) == 7 and len(evaluated["gate_matrix"][0]) == 7


def test_your_own_three_task_jsonl_trains_and_evaluates_centrally_with_one_expert_per_task(tmp_path, tiny_model_dir, monkeypatch):
    records = toy_records(("translate", "classify", "summarise"), 20)
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"prompt": r.instruction, "response": r.response, "skill": r.task}) + "\n" for r in records))
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(tiny_model_dir), "--dataset", "mine.jsonl", "--no-progress"]
    mapping = ["--instruction-column", "prompt", "--context-column", "", "--task-column", "skill"]
    shape = ["--prompts-per-expert", "2", "--inject-layer", "2", "--max-length", "64", "--samples", "60"]
    assert main(["train", *common, *mapping, *shape, "--steps", "3", "--gate-pretrain-steps", "10"]) == 0
    out = tmp_path / "runs" / "mine-mops"  # named after the file
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["classify", "summarise", "translate"] and results["settings"]["experts"] == 3
    assert json.loads((out / "checkpoint" / "adapter_config.json").read_text())["num_experts"] == 3
    assert main(["eval", str(out), "--no-progress"]) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert len(evaluated["gate_matrix"]) == 3 and len(evaluated["gate_matrix"][0]) == 3


def test_generation_samples_and_max_new_tokens_choose_what_is_answered_and_how_long(tokenizer, pretrained_base, monkeypatch):
    from mops_core.generate import Generator
    from mops_core.metrics import rouge_l

    settings = tiny_settings(generation_samples=2, max_new_tokens=5)
    data = toy_data(tokenizer, settings)
    session = session_on(settings, copy.deepcopy(pretrained_base), tokenizer, data)
    asked, answered = [], []
    original = Generator.answer_many

    def spy(self, questions, **kw):
        asked.append((list(questions), kw["max_new_tokens"]))
        answered.extend(original(self, questions, **kw))
        return answered[-len(questions):]

    monkeypatch.setattr(Generator, "answer_many", spy)
    result = session.generation()
    firsts = [r for t in TASKS3 for r in [r for r in data.test_records if r.task == t][:2]]
    assert asked == [([(r.instruction, r.context) for r in firsts], 5)]  # the first two test samples of every task
    assert all(len(a.token_ids) <= 5 for a in answered) and any(len(a.token_ids) == 5 for a in answered)
    assert result.overall.samples == 6 and {s.samples for s in result.per_task.values()} == {2}
    expected = sum(rouge_l(a.text, r.response) for a, r in zip(answered, firsts)) / 6
    assert result.overall.rouge_l == pytest.approx(expected)
    assert session_on(settings.replace(generation_samples=0), pretrained_base, tokenizer, data).generation() is None


def test_cli_reports_bad_settings_without_a_traceback(capsys, toy_data_dir):
    assert main(["train", "--experts", "zero", "--data-dir", str(toy_data_dir)]) == 2
    assert "setting 'experts': expected an integer" in capsys.readouterr().out


def test_a_bfloat16_base_keeps_prompts_and_gate_float32_and_the_loss_near_float32(tokenizer, pretrained_base):
    """`dtype = "bfloat16"` halves the frozen base only; what trains, and its gradients, stay float32."""
    settings = tiny_settings(samples=60)
    data = toy_data(tokenizer, settings)
    batch = collate(data.train[:4], tokenizer.pad_token_id)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(settings, copy.deepcopy(pretrained_base).to(dtype), tokenizer)
        with torch.no_grad():
            model.prompts.normal_(generator=torch.Generator().manual_seed(0))
        loss = model(**batch).loss
        loss.backward()
        params = model.trainable_parameters()
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params), dtype
        results[dtype] = loss.item(), torch.cat([p.grad.flatten() for p in params])
    (loss32, grad32), (loss16, grad16) = results[torch.float32], results[torch.bfloat16]
    assert loss16 == pytest.approx(loss32, rel=1e-2)
    assert torch.nn.functional.cosine_similarity(grad32, grad16, dim=0) > 0.99


def test_eval_batch_size_changes_how_many_samples_go_together_not_the_score(tokenizer, pretrained_base):
    settings = tiny_settings(samples=60)
    data = toy_data(tokenizer, settings)
    model = build_model(settings, copy.deepcopy(pretrained_base), tokenizer)
    calls = []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs['input_ids'].shape[0]), with_kwargs=True)
    one = evaluate(model, data.test, data.tasks, pad_id=tokenizer.pad_token_id, batch_size=1, progress=False)
    assert calls == [1] * len(data.test)
    calls.clear()
    four = evaluate(model, data.test, data.tasks, pad_id=tokenizer.pad_token_id, batch_size=4, progress=False)
    assert max(calls) == 4 and sum(calls) == len(data.test) and len(calls) == -(-len(data.test) // 4)
    assert four.perplexity == pytest.approx(one.perplexity, rel=1e-5) and four.tokens == one.tokens


def test_batch_size_eval_samples_and_seed_act_as_they_say(tokenizer, pretrained_base):
    settings = tiny_settings(samples=60, **{"batch-size": 3, "eval-samples": 5, "seed": 1})
    data = toy_data(tokenizer, settings)
    session = session_on(settings, pretrained_base, tokenizer, data)
    seen = []
    session.model.register_forward_hook(lambda m, args, kwargs, out: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    stats = session.train(data.train, 4, seed=0)
    assert seen == [3] * 4 and stats.examples == 12  # batch-size samples a step
    assert session.evaluate().samples == 5  # the first eval-samples of the test split
    gate = {seed: build_model(settings.replace(seed=seed), pretrained_base, tokenizer).gate.fc1.weight for seed in (1, 2)}
    assert torch.equal(gate[1], build_model(settings, pretrained_base, tokenizer).gate.fc1.weight)
    assert not torch.equal(gate[1], gate[2])  # seed: the gate's initialisation (and every sample order)
