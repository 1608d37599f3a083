"""The ClientApp builds its model from the run config as `mops train` and the ServerApp do."""

import tomllib
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client import app as client_app
from client import task
from mops_core.compression.layerwise import block_linears
from mops_core.config import Settings
from mops_core.session import Session
from mops_core.start_state import prepare_or_load, tensor_sha

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
    key, _ = prepare_or_load(server, progress=False)
    steps = []
    original = Session.train

    def spy(self, examples, count, **kwargs):
        steps.append(count)
        return original(self, examples, count, **kwargs)

    monkeypatch.setattr(Session, "train", spy)
    arrays = ArrayRecord({k: v.cpu() for k, v in server.model.federated_state_dict().items()})
    config = ConfigRecord({"server-round": 1, "start-state": key, "input-prompts-sha": tensor_sha(server.model.input_prompts)})
    metadata = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
        created_at=0.0, ttl=60.0, message_type=MessageType.TRAIN,
    )
    message = Message(RecordDict({"arrays": arrays, "config": config}), metadata=metadata)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config=run_config)
    reply = client_app.train(message, context)

    assert not reply.has_error() and reply.content["metrics"]["num-examples"] > 0
    client = task.session(settings)
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
