import copy

import pytest
import torch
from helpers import tiny_settings

from mops_core.session import build_model
from mops_core.data import TASKS, Formatter
from mops_core.generate import Generator


def tuned(pretrained_base, tokenizer, gating, method="mops"):
    settings = tiny_settings(gating=gating, method=method)
    model = build_model(settings, copy.deepcopy(pretrained_base), tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.input_prompts.copy_(torch.randn(model.input_prompts.shape, generator=generator) * 0.5)
        model.init_prompts_from_input()
        model.prompts.add_(torch.randn(model.prompts.shape, generator=generator) * 2.0)
        if model.gate is not None:
            model.gate.fc2.weight.normal_(0, 1.0, generator=generator)
    return model, Generator(model, Formatter(tokenizer, 64, TASKS["dolly"]), tokenizer.eos_token_id, tokenizer.pad_token_id)


def full_forward_logprobs(model, question, answer, eos):
    """The reference: a full MoPs forward (no cache, no hooks) over the whole sequence for every new token.

    The choice excludes EOS, as `min_new_tokens` does in generate; the log-probabilities are the model's own.
    """
    tokens, logprobs, choices = list(question), [], []
    for token in answer:
        ids = torch.tensor([tokens])
        question_mask = torch.zeros_like(ids, dtype=torch.bool)
        question_mask[:, : len(question)] = True
        logits = model(ids, torch.ones_like(ids), question_mask, return_logits=True).logits[0, -1]
        choices.append(int(logits.masked_fill(torch.arange(logits.numel()) == eos, float("-inf")).argmax()))
        logprobs.append(torch.log_softmax(logits, -1)[token].item())
        tokens.append(token)
    return choices, logprobs


@pytest.mark.parametrize("gating, method", [("attention", "mops"), ("hidden", "mops"), ("none", "prompt")])
def test_cached_greedy_generation_equals_full_forward_passes(pretrained_base, tokenizer, gating, method):
    model, generator = tuned(pretrained_base, tokenizer, gating, method)
    for instruction in ("abc defg", "ijk lmnop", "qrs tuv"):
        answer = generator.answer(instruction, max_new_tokens=12, min_new_tokens=12)
        question = generator.formatter.question_ids(instruction)
        choices, logprobs = full_forward_logprobs(model, question, answer.token_ids, tokenizer.eos_token_id)
        assert answer.token_ids == choices, (gating, instruction)
        torch.testing.assert_close(torch.tensor(answer.logprobs), torch.tensor(logprobs), atol=1e-4, rtol=1e-4)
        assert (answer.gate is None) == (gating == "none")


@pytest.mark.parametrize("gating, method", [("attention", "mops"), ("hidden", "mops"), ("none", "prompt")])
def test_batched_greedy_generation_gives_the_tokens_of_one_question_at_a_time(pretrained_base, tokenizer, gating, method):
    model, generator = tuned(pretrained_base, tokenizer, gating, method)
    # Questions of different lengths, so that the batch pads; one with a context.
    questions = [("abc defg", ""), ("ijk lmnop qrs tuv wx abc defg hij", "klm nop"), ("q", ""), ("ABC DEF GHI", "x")]
    one_by_one = [generator.answer(i, c, max_new_tokens=10) for i, c in questions]
    batched = generator.answer_many(questions, max_new_tokens=10, batch_size=3)  # a full batch and a short one
    assert [a.token_ids for a in batched] == [a.token_ids for a in one_by_one]
    assert [a.text for a in batched] == [a.text for a in one_by_one]
    assert any(len(set(a.token_ids)) > 1 for a in batched), "answers worth comparing"
    for b, a in zip(batched, one_by_one):
        if gating == "none":
            assert b.gate is None and a.gate is None
        else:
            torch.testing.assert_close(torch.tensor(b.gate), torch.tensor(a.gate), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gating", ["attention", "hidden"])
def test_the_hooks_really_act(pretrained_base, tokenizer, gating):
    """Teeth for the test above: the base without the hooks scores the same tokens differently."""
    model, generator = tuned(pretrained_base, tokenizer, gating)
    answer = generator.answer("abc defg", max_new_tokens=12, min_new_tokens=12)
    question = torch.tensor([generator.formatter.question_ids("abc defg")])
    sequence = torch.cat([model.embed(question), model.base.model.embed_tokens(torch.tensor([answer.token_ids]))], 1)
    logits = model.base(inputs_embeds=sequence).logits[0, question.shape[1] + model.num_prompts : -1]
    plain = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(answer.token_ids).unsqueeze(1))[:, 0]
    assert (plain - torch.tensor(answer.logprobs)).abs().max() > 1e-2


def test_sampling_is_seeded(pretrained_base, tokenizer):
    _, generator = tuned(pretrained_base, tokenizer, "attention")
    torch.manual_seed(3)
    a = generator.answer("abc", do_sample=True, temperature=1.5, max_new_tokens=10, min_new_tokens=10)
    torch.manual_seed(3)
    b = generator.answer("abc", do_sample=True, temperature=1.5, max_new_tokens=10, min_new_tokens=10)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 10


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, tiny_model_dir, toy_data_dir):
    from mops_core.cli import main

    out = tmp_path_factory.mktemp("gen-run")
    args = ["train", "--model", str(tiny_model_dir), "--data-dir", str(toy_data_dir), "--no-progress", "--experts", "7",
            "--prompts-per-expert", "2", "--inject-layer", "2", "--max-length", "64", "--samples", "140", "--steps", "3",
            "--gate-pretrain-steps", "10", "--eval-samples", "4", "--out", str(out)]
    assert main(args) == 0
    return out / "checkpoint"


def test_cli_generate_one_question_and_a_file(trained_checkpoint, tmp_path, capsys):
    import json

    from mops_core.cli import main

    assert main(["generate", str(trained_checkpoint), "abc defg", "--max-new-tokens", "8", "--no-progress"]) == 0
    assert "experts: E" in capsys.readouterr().out
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"instruction": "abc"}\n{"instruction": "ijk", "context": "lmn"}\n')
    answers = tmp_path / "a.jsonl"
    assert main(["generate", str(trained_checkpoint), "--input-file", str(questions), "--output", str(answers),
                 "--max-new-tokens", "6", "--no-progress"]) == 0
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["abc", "ijk"] and all(len(r["gate"]) == 7 for r in rows)
    questions.write_text('{"instruction": "abc"}\n{"question": "no instruction"}\n')
    assert main(["generate", str(trained_checkpoint), "--input-file", str(questions), "--output", str(answers), "--no-progress"]) == 2
    assert f"{questions}:2: missing field(s) instruction" in capsys.readouterr().out


def test_generating_on_another_base_fails_clearly(trained_checkpoint, tmp_path, tokenizer, capsys):
    from helpers import pretrained_tiny_base

    from mops_core.cli import main

    other = tmp_path / "other-llama"
    pretrained_tiny_base(tokenizer, steps=5, seed=7).save_pretrained(other)
    tokenizer.save_pretrained(other)
    assert main(["generate", str(trained_checkpoint), "abc", "--model", str(other), "--no-progress"]) == 2
    assert "was tuned on another base" in capsys.readouterr().out


def test_cli_inspect_shows_counts_and_expert_shares(trained_checkpoint, capsys):
    from mops_core.cli import main

    assert main(["inspect", str(trained_checkpoint), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "parameters: experts (prompts)" in out and "routing accuracy" in out and "creative_writing" in out
