"""Personalized gates: each node keeps its own gate (gate-aggregation=local), and an evaluating client
may first adapt a copy of what personalizes the model (personalize-steps). No Ray, no network."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from test_strategy import SHAPES, arrays, metrics, reply, strategy

from client import app as client_app
from client import node
from mops_core.config import FederatedConfig, Settings
from mops_core.session import Session
from mops_core.start_state import prepare_or_load, store_input_prompts, tensor_sha
from server import protocol

GATE_KEYS = [k for k in SHAPES if k.startswith("gate.")]


def test_with_local_gates_the_server_averages_the_experts_alone_and_sends_its_gate_on_unchanged(server_identity):
    from test_strategy import FakeGrid

    mapping = {11: 0, 12: 1}
    s = strategy(partitions=mapping, fraction_train=1.0, min_available_nodes=2, expected={"prompts": SHAPES["prompts"]})
    sent = ArrayRecord({k: Array(v) for k, v in arrays(0).items()})
    s.configure_train(1, sent, ConfigRecord({}), FakeGrid(mapping))
    experts = {n: {"prompts": arrays(n)["prompts"]} for n in mapping}
    agg, _ = s.aggregate_train(1, [reply(11, experts[11], metrics(10)), reply(12, experts[12], metrics(30))])
    np.testing.assert_allclose(agg["prompts"].numpy(), 0.25 * experts[11]["prompts"] + 0.75 * experts[12]["prompts"], rtol=1e-6)
    for key in GATE_KEYS:  # the server's gate: sent on bit for bit
        assert np.array_equal(agg[key].numpy(), sent[key].numpy())
    dropped, _ = s.aggregate_train(1, [reply(11, arrays(11), metrics(10))])  # a reply that carries a gate
    assert dropped is None and "unexpected" in s.rounds[1].dropped[0]


def test_local_gates_under_dp_are_refused_naming_the_key():
    with pytest.raises(ValueError, match="gate-aggregation"):
        FederatedConfig(gate_aggregation="local", dp_clip=1.0)
    with pytest.raises(ValueError, match="personalize-steps"):
        FederatedConfig(personalize_steps=-1)


@pytest.fixture(scope="module")
def served(tiny_model_dir, toy_data_dir, tmp_path_factory):
    """The server's session at round 1 (start state prepared, P1 in the shared cache), and the run config."""
    cache = tmp_path_factory.mktemp("personal-cache")
    run_config = {
        "model": str(tiny_model_dir), "model-cache-dir": str(cache), "data-dir": str(toy_data_dir), "experts": 7,
        "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16, "samples": 140, "max-length": 48,
        "input-prompt-steps": 2, "gate-pretrain-steps": 5, "local-steps": 3, "min-partition-size": 2,
        "gate-aggregation": "local", "client-test-fraction": 0.2,
    }
    server = Session.open(Settings.from_flat(run_config), progress=False)
    prepare_or_load(server, progress=False)
    store_input_prompts(server.settings, server.model.input_prompts, tensor_sha(server.model.input_prompts))
    return server, run_config


def message(server, arrays_record, message_type, server_round):
    config = ConfigRecord({"server-round": server_round, "input-prompts-sha": tensor_sha(server.model.input_prompts),
                           "tasks": list(server.tasks)})
    metadata = Metadata(run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id=str(server_round), created_at=0.0, ttl=60.0, message_type=message_type)
    return Message(RecordDict({"arrays": arrays_record, "config": config}), metadata=metadata)


def gate_of(model):
    return {k: v.detach().clone() for k, v in model.federated_state_dict().items() if k.startswith("gate.")}


def test_a_local_gate_never_leaves_its_node_persists_across_rounds_and_scores_the_nodes_evaluation(served, tmp_path, monkeypatch):
    server, run_config = served
    global_state = ArrayRecord({k: v.cpu() for k, v in server.model.federated_state_dict().items()})
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4, "adapter-dir": str(tmp_path / "mine")},
                      state=RecordDict(), run_config=run_config)
    started_from = []
    original = Session.train
    monkeypatch.setattr(Session, "train", lambda self, *a, **kw: started_from.append(gate_of(self.model)) or original(self, *a, **kw))

    first = client_app.train(message(server, global_state, MessageType.TRAIN, 1), context)
    assert not first.has_error() and list(first.content["arrays"].keys()) == ["prompts"]  # no gate tensor leaves the node
    own = {k: torch.from_numpy(v.numpy()) for k, v in context.state[protocol.OWN_GATE].items()}
    assert set(own) == set(gate_of(server.model)) and any(not torch.equal(own[k], gate_of(server.model)[k]) for k in own)
    assert all(torch.equal(started_from[0][k], gate_of(server.model)[k]) for k in own)  # first round: the global gate

    second = client_app.train(message(server, global_state, MessageType.TRAIN, 2), context)
    assert list(second.content["arrays"].keys()) == ["prompts"]
    assert all(torch.equal(started_from[1][k], own[k]) for k in own)  # second round: its own gate, not the global one

    # Its evaluation scores the global experts with its own gate: the same as the server's model with that gate.
    scored = client_app.evaluate(message(server, global_state, MessageType.EVALUATE, 2), context).content["metrics"]
    mine = {k: torch.from_numpy(v.numpy()) for k, v in context.state[protocol.OWN_GATE].items()}
    part = node.partition(server.settings, server.tasks, 0, 4)
    held = server.formatter.examples(part.heldout)
    saved = gate_of(server.model)
    server.model.load_state_dict(mine, strict=False)
    try:
        expected = server.evaluate(held)
    finally:
        server.model.load_state_dict(saved, strict=False)
    assert scored["eval-nll"] == pytest.approx(expected.loss * expected.tokens, rel=1e-5)
    assert protocol.ADAPTED_NLL not in scored  # personalize-steps 0: no adaptation

    # Its personalized adapter: the round's global experts with its own gate, a checkpoint like any other.
    from mops_core import checkpoint

    kept = checkpoint.read(tmp_path / "mine")
    assert torch.equal(kept.tensors["prompts"], server.model.federated_state_dict()["prompts"].float())
    assert all(torch.equal(kept.tensors[k], mine[k].float()) for k in mine)


def test_the_personalized_checkpoint_loads_and_generates(served, tmp_path, capsys):
    from mops_core.cli import main

    server, run_config = served
    global_state = ArrayRecord({k: v.cpu() for k, v in server.model.federated_state_dict().items()})
    context = Context(run_id=1, node_id=8, node_config={"partition-id": 1, "num-partitions": 4, "adapter-dir": str(tmp_path / "node")},
                      state=RecordDict(), run_config=run_config)
    client_app.train(message(server, global_state, MessageType.TRAIN, 1), context)
    client_app.evaluate(message(server, global_state, MessageType.EVALUATE, 1), context)  # saved with the gate it trained
    assert main(["generate", str(tmp_path / "node"), "abc defg", "--max-new-tokens", "5", "--no-progress"]) == 0
    assert "experts: E" in capsys.readouterr().out


@pytest.mark.parametrize("method", ["mops", "fedprompt"])
def test_adapting_changes_only_the_copy_and_both_methods_take_the_same_steps(served, method):
    server, run_config = served
    settings = Settings.from_flat({**run_config, "method": method, "gate-aggregation": "global"})
    session = node.session(settings, server.tasks)
    part = node.partition(settings, server.tasks, 2, 4)
    examples = node.tokenised(part, session.formatter)
    before = {k: v.clone() for k, v in session.model.adapter_state_dict().items()}
    with session.adapted(examples, 4, seed=1) as stats:
        during = session.model.adapter_state_dict()
        changed = {k for k in before if not torch.equal(before[k], during[k])}
    assert stats.steps == 4  # the same steps for MoPs and FedPrompt
    if method == "mops":  # the gate's weights; the experts and the frozen input prompts stay
        assert changed and all(k.startswith("gate.") for k in changed)
    else:
        assert changed == {"prompts"}
    after = session.model.adapter_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # put back exactly
    assert all(p.grad is None for p in session.model.trainable_parameters())


def test_an_evaluating_client_reports_the_global_and_the_adapted_perplexity(served):
    from server.strategy import aggregate_client_eval

    server, run_config = served
    global_state = ArrayRecord({k: v.cpu() for k, v in server.model.federated_state_dict().items()})
    config = {**run_config, "gate-aggregation": "global", "personalize-steps": 5, "num-server-rounds": 1}
    replies = []
    for part in (0, 3):
        context = Context(run_id=1, node_id=9, node_config={"partition-id": part, "num-partitions": 4}, state=RecordDict(),
                          run_config=config)
        replies.append(client_app.evaluate(message(server, global_state, MessageType.EVALUATE, 1), context).content)
    for content in replies:
        assert protocol.eval_reply_problem(content, len(server.tasks)) is None
        scored = content["metrics"]
        assert scored["adapted-nll"] != scored["eval-nll"] and len(scored["adapted-task-nll"]) == len(server.tasks)
    summary = aggregate_client_eval([dict(r["metrics"]) for r in replies], list(server.tasks))
    tokens = sum(r["metrics"]["eval-tokens"] for r in replies)
    adapted = np.exp(sum(r["metrics"]["adapted-nll"] for r in replies) / tokens)
    assert summary["adapted"]["perplexity"] == pytest.approx(adapted) and summary["perplexity"] != summary["adapted"]["perplexity"]
    # Adapting is costly: only in the rounds that metrics-every names, and the last (round 1 of 3 is neither).
    context = Context(run_id=1, node_id=9, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(),
                      run_config={**config, "num-server-rounds": 3})
    scored = client_app.evaluate(message(server, global_state, MessageType.EVALUATE, 1), context).content["metrics"]
    assert "adapted-nll" not in scored and scored["eval-nll"] == replies[0]["metrics"]["eval-nll"]
