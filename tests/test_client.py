"""The ClientApp builds its model from the run config as `mops train` and the ServerApp do."""

import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client import app as client_app
from client import node
from mops_core.compression.layerwise import block_linears
from mops_core.config import Settings
from mops_core.session import Session
from mops_core.start_state import prepare_or_load, store_input_prompts, tensor_sha

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def test_a_run_config_value_of_every_concern_reaches_the_clients_model(tiny_model_dir, toy_data_dir, tmp_path, monkeypatch):
    run_config = {
        **tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"],
        # model, compression, mops, data, train, federated: one value off its default in each
        "model": str(tiny_model_dir), "model-cache-dir": str(tmp_path / "cache"),
        "compression": "magnitude:0.5",
        "experts": 7, "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16, "gate-floor": 0.05,
        "data-dir": str(toy_data_dir), "samples": 140, "max-length": 48,
        "input-prompt-steps": 2, "gate-pretrain-steps": 5, "activation-cache": False,
        "local-steps": 3, "min-partition-size": 2,
    }
    settings = Settings.from_flat(run_config)
    server = Session.open(settings, progress=False)  # what the ServerApp prepares before round 1
    prepare_or_load(server, progress=False)
    store_input_prompts(settings, server.model.input_prompts, tensor_sha(server.model.input_prompts))
    steps = []
    original = Session.train

    def spy(self, examples, count, **kwargs):
        steps.append(count)
        return original(self, examples, count, **kwargs)

    monkeypatch.setattr(Session, "train", spy)
    arrays = ArrayRecord({k: v.cpu() for k, v in server.model.federated_state_dict().items()})
    config = ConfigRecord({"server-round": 1, "input-prompts-sha": tensor_sha(server.model.input_prompts),
                           "tasks": list(server.tasks)})
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN,
    )
    message = Message(RecordDict({"arrays": arrays, "config": config}), metadata=metadata)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config=run_config)
    reply = client_app.train(message, context)

    assert not reply.has_error() and reply.content["metrics"]["num-examples"] > 0
    client = node.session(settings, server.tasks)
    assert client is not server and client.settings == settings
    assert Path(client.base.config.name_or_path) == tiny_model_dir  # model
    assert (tmp_path / "cache" / "compressed").is_dir()  # model-cache-dir
    for layer in client.base.model.layers:  # compression: half of every linear layer pruned
        for linear in block_linears(layer).values():
            assert (linear.weight == 0).float().mean().item() == 0.5
    assert client.model.num_prompts == 14 and client.model.gate.floor == 0.05  # mops
    assert client.formatter.max_length == 48  # data
    assert client.cache is None  # train: the activation cache is off, as the run config says
    assert steps == [3]  # federated: local-steps
    assert torch.equal(client.model.input_prompts, server.model.input_prompts)  # the server's P1, installed


def message(content, message_type):
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=60.0, message_type=message_type,
    )
    return Message(RecordDict(content), metadata=metadata)


def test_a_node_with_its_own_file_trains_on_exactly_its_records_without_the_shared_dataset(
    tiny_model_dir, toy_data_dir, tmp_path, monkeypatch
):
    from helpers import toy_records

    from mops_core.data import DataError, TASKS

    common = {"model": str(tiny_model_dir), "model-cache-dir": str(tmp_path / "cache"), "prompts-per-expert": 2,
              "inject-layer": 2, "gate-hidden": 16, "samples": 70, "max-length": 48, "input-prompt-steps": 1,
              "gate-pretrain-steps": 2, "local-steps": 2}
    server = Session.open(Settings.from_flat({**common, "data-dir": str(toy_data_dir)}), progress=False)
    prepare_or_load(server, progress=False)
    sha = tensor_sha(server.model.input_prompts)
    store_input_prompts(server.settings, server.model.input_prompts, sha)
    assert server.model.experts == 7 == len(server.tasks)  # experts 0: one per task of the run

    # The node's file: two of the run's tasks and one it does not know, under the default column names.
    mine = toy_records((TASKS["dolly"][2], TASKS["dolly"][5], "poetry"), 4, seed=5)
    own = tmp_path / "node" / "mine.jsonl"
    own.parent.mkdir()
    own.write_text("".join(json.dumps({"instruction": r.instruction, "context": r.context, "response": r.response,
                                       "task": r.task}) + "\n" for r in mine))
    # The node has no copy of the shared dataset: reading it would fail.
    run_config = {**common, "dataset": str(tmp_path / "nowhere" / "shared.jsonl")}
    context = Context(run_id=1, node_id=7, node_config={"data-file": str(own)}, state=RecordDict(), run_config=run_config)
    tasks = ConfigRecord({"tasks": list(server.tasks), "input-prompts-sha": sha})

    report = client_app.query(message({"config": tasks}, MessageType.QUERY), context).content
    part = node.local_partition(Settings.from_flat(run_config), server.tasks, str(own))
    assert len(part.heldout) == 1 and sorted(part.records + part.heldout, key=repr) == sorted(mine, key=repr)  # 10% held out
    counts = report["metrics"]["task-counts"]
    assert report["metrics"]["num-examples"] == 11 and counts[2] + counts[5] == sum(counts) == 11 - dict(part.unknown_tasks).get("poetry", 0)
    assert list(report["unknown-tasks"]["names"]) == ["poetry"]

    trained = []
    original = Session.train
    monkeypatch.setattr(Session, "train", lambda self, examples, count, **kw: trained.append(examples) or original(self, examples, count, **kw))
    config = ConfigRecord({"server-round": 1, "input-prompts-sha": tensor_sha(server.model.input_prompts),
                           "tasks": list(server.tasks)})
    arrays = ArrayRecord({k: v.cpu() for k, v in server.model.federated_state_dict().items()})
    reply = client_app.train(message({"arrays": arrays, "config": config}, MessageType.TRAIN), context)
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 11
    assert trained == [server.formatter.examples(part.records)]  # exactly the file's records but the held-out one, in order
    assert {ex.task_id for ex in trained[0]} <= {2, 5, -1} and -1 in {ex.task_id for ex in trained[0]}  # unknown: trained on

    # Federated evaluation scores the held-out record only, summed so that the server can weigh by tokens.
    scored = client_app.evaluate(message({"arrays": arrays, "config": config}, MessageType.EVALUATE), context).content["metrics"]
    held = server.formatter.examples(part.heldout)
    assert scored["num-examples"] == 1 and scored["eval-tokens"] == sum(e.response_len for e in held)
    expected = server.evaluate(held)
    assert scored["eval-nll"] == pytest.approx(expected.loss * expected.tokens, rel=1e-5) and len(scored["task-tokens"]) == 7
    for i, t in enumerate(server.tasks):  # per task: summed NLL, as the perplexity says it
        score = expected.per_task.get(t)
        assert scored["task-nll"][i] == (pytest.approx(math.log(score.perplexity) * score.tokens, rel=1e-5) if score else 0.0)

    own.write_text(own.read_text() + '{"instruction": "x", "context": "", "response": "y"}\n')
    with pytest.raises(DataError, match=rf"{own}:13: missing field\(s\) task"):
        client_app.query(message({"config": tasks}, MessageType.QUERY), context)


def test_a_node_with_its_own_cache_reports_its_base_and_stores_the_input_prompts_only_when_their_hash_holds(
    tiny_model_dir, toy_data_dir, tmp_path
):
    from mops_core.loading import base_fingerprint
    from mops_core.model import INPUT_PROMPTS
    from mops_core.start_state import StartStateError, input_prompts_path

    common = {"model": str(tiny_model_dir), "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16, "samples": 70,
              "max-length": 48, "input-prompt-steps": 1, "gate-pretrain-steps": 2, "local-steps": 1, "data-dir": str(toy_data_dir)}
    server = Session.open(Settings.from_flat({**common, "model-cache-dir": str(tmp_path / "server")}), progress=False)
    prepare_or_load(server, progress=False)
    prompts, sha = server.model.input_prompts.detach().float().clone(), tensor_sha(server.model.input_prompts)
    node_cache = tmp_path / "node"  # another machine: nothing of the server's cache
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2, "model-cache-dir": str(node_cache)},
                      state=RecordDict(), run_config={**common, "model-cache-dir": str(tmp_path / "server")})
    config = ConfigRecord({"tasks": list(server.tasks), "input-prompts-sha": sha})

    report = client_app.query(message({"config": config}, MessageType.QUERY), context).content
    assert report["metrics"]["has-input-prompts"] == 0  # the node's own cache (node-config) is empty
    assert report["node"]["base-fingerprint"] == base_fingerprint(server.base)
    arrays = ArrayRecord({k: v.cpu() for k, v in server.model.federated_state_dict().items()})
    train = message({"arrays": arrays, "config": ConfigRecord({**config, "server-round": 1})}, MessageType.TRAIN)
    with pytest.raises(StartStateError, match="this node lacks the run's input prompts .*is not in its cache"):
        client_app.train(train, context)

    def send(tensor, claimed):
        start = message({"arrays": ArrayRecord({INPUT_PROMPTS: tensor}), "config": ConfigRecord({"input-prompts-sha": claimed})},
                        "query.start_state")
        return client_app.receive_input_prompts(start, context)

    tampered = prompts.clone()
    tampered[0, 0] += 1e-3
    with pytest.raises(StartStateError, match=f"do not match their hash \\(expected {sha}"):
        send(tampered, sha)
    assert not any(node_cache.rglob("*.safetensors"))  # nothing cached
    with pytest.raises(StartStateError, match="not an input-prompts hash"):
        send(prompts, "../../elsewhere")
    assert send(prompts, sha).content["metrics"]["stored"] == 1
    assert input_prompts_path(Settings.from_flat({**common, "model-cache-dir": str(node_cache)}), sha).is_file()
    assert client_app.query(message({"config": config}, MessageType.QUERY), context).content["metrics"]["has-input-prompts"] == 1
    assert not client_app.train(train, context).has_error()
    assert torch.equal(node.session(Settings.from_flat({**common, "model-cache-dir": str(node_cache)}), server.tasks).model.input_prompts,
                       server.model.input_prompts)

    other = {**context.node_config, "model": str(tmp_path / "elsewhere")}  # a node that loads another base
    server.base.save_pretrained(tmp_path / "elsewhere")
    server.tokenizer.save_pretrained(tmp_path / "elsewhere")
    weights = load_file(str(tmp_path / "elsewhere" / "model.safetensors"))
    save_file({k: v * 1.5 if v.ndim == 2 else v for k, v in weights.items()}, str(tmp_path / "elsewhere" / "model.safetensors"),
              metadata={"format": "pt"})
    foreign = Context(run_id=1, node_id=8, node_config=other, state=RecordDict(), run_config=context.run_config)
    assert client_app.query(message({"config": config}, MessageType.QUERY), foreign).content["node"]["base-fingerprint"] != base_fingerprint(server.base)


@pytest.mark.slow
@pytest.mark.parametrize("module", ["client.app", "server.app"])
def test_the_apps_print_what_mops_core_logs_from_info_up(module):
    """A Flower app's process configures no logging: without routing, mops_core's INFO lines (the compile's
    time, dequantising, compressing) would vanish there."""
    import subprocess
    import sys

    line = "decoder layers compiled (torch.compile, once per process): the first pass took 1.0 s"
    code = f"import logging, {module}; logging.getLogger('mops_core.compiled').info({line!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=PYPROJECT.parent, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert line in done.stdout + done.stderr


def test_input_prompts_pruned_or_damaged_mid_run_are_reported_as_lacking_and_replaced_when_sent_again(tmp_path):
    from mops_core.start_state import LACKS_INPUT_PROMPTS, StartStateError, has_input_prompts, input_prompts_path, load_input_prompts

    settings = Settings.from_flat({"model-cache-dir": str(tmp_path)})
    prompts = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sha = tensor_sha(prompts)
    path = store_input_prompts(settings, prompts, sha)
    assert has_input_prompts(settings, sha)

    path.write_bytes(b"half a safetensors file")  # a disk fault, a partial copy
    assert not has_input_prompts(settings, sha)  # the query says so: the server sends them again
    with pytest.raises(StartStateError, match=f"^{LACKS_INPUT_PROMPTS} \\({sha}\\): .* is unreadable or changed"):
        load_input_prompts(None, settings, sha)
    store_input_prompts(settings, prompts, sha)  # what the server sends replaces the damaged copy
    assert has_input_prompts(settings, sha) and torch.equal(load_file(str(path))["input_prompts"], prompts)

    save_file({"input_prompts": prompts + 1}, str(path))  # another tensor under this hash
    assert not has_input_prompts(settings, sha)
    import shutil

    shutil.rmtree(input_prompts_path(settings, sha).parent)  # `mops cache prune` between two rounds
    assert not has_input_prompts(settings, sha)
    with pytest.raises(StartStateError, match=f"^{LACKS_INPUT_PROMPTS} \\({sha}\\): .* is not in its cache"):
        load_input_prompts(None, settings, sha)
