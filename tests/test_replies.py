"""A node's kept training reply (reply-cache-dir): reused only for exactly the same round, data,
settings and global state, bit for bit, and never when damaged."""

import json
import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client import app as client_app
from client.replies import ReplyCache, kept_round
from mops_core.config import Settings
from mops_core.session import Session
from mops_core.start_state import prepare_or_load, store_input_prompts, tensor_sha

STATE = {"mops.prompts": np.arange(12, dtype=np.float32).reshape(3, 4), "mops.gate.w": np.ones(5, dtype=np.float32)}
CONFIG = {"seed": 0, "local-steps": 250, "num-server-rounds": 20, "out-dir": "/a"}


def test_a_key_changes_with_what_decides_a_reply_and_only_with_that(tmp_path):
    cache = ReplyCache(tmp_path, partition=3)
    key = cache.key(2, STATE, CONFIG)
    assert cache.key(2, dict(reversed(list(STATE.items()))), CONFIG) == key  # the arrays' order is not the state
    # what a resumed run may change never decides a client's training (RESUMABLE)
    assert cache.key(2, STATE, {**CONFIG, "num-server-rounds": 40, "out-dir": "/b", "round-timeout": 5.0}) == key
    moved = {**STATE, "mops.gate.w": np.array([1, 1, 1, 1, 1.0000001], dtype=np.float32)}
    others = [cache.key(3, STATE, CONFIG), ReplyCache(tmp_path, 4).key(2, STATE, CONFIG), cache.key(2, moved, CONFIG),
              cache.key(2, STATE, {**CONFIG, "local-steps": 251}), cache.key(2, STATE, {**CONFIG, "seed": 1}),
              cache.key(2, {**STATE, "mops.gate.w": STATE["mops.gate.w"].astype(np.float64)}, CONFIG)]
    assert len({key, *others}) == len(others) + 1


def test_a_kept_reply_comes_back_bit_for_bit_and_a_damaged_one_not_at_all(tmp_path, caplog):
    cache = ReplyCache(tmp_path / "replies", partition=3)
    arrays = {"z": torch.randn(3, 4), "a": torch.randn(7)}  # not in sorted order: the order sent is kept
    metrics = {"examples": 41, "loss": 2.0000000000000004, "train_seconds": 1.5, "client_seconds": 2.25, "gate": [0.1, 0.9]}
    key = cache.key(2, {k: v.numpy() for k, v in arrays.items()}, CONFIG)
    assert cache.get(2, key) is None  # nothing kept yet
    cache.put(2, key, arrays, metrics)
    kept = cache.get(2, key)
    assert list(kept.arrays) == ["z", "a"] and all(torch.equal(kept.arrays[k], arrays[k]) for k in arrays)
    assert kept.metrics == metrics and json.dumps(kept.metrics) == json.dumps(metrics)
    assert cache.get(3, key) is None  # another round's reply is another file

    other = ReplyCache(tmp_path / "replies", partition=4)
    other.put(2, key, arrays, metrics)
    cache.put(3, "ab" * 16, arrays, metrics)  # the node's next round: its last reply goes, the other node's stays
    names = sorted(p.name for p in (tmp_path / "replies").iterdir())
    assert [kept_round(n) for n in names] == [3, 2] and names[0].startswith("partition-3-") and names[1].startswith("partition-4-")

    path = tmp_path / "replies" / names[0]
    path.write_bytes(path.read_bytes()[:-9])  # cut short, as by a full disk outside the atomic write
    with caplog.at_level(logging.WARNING):
        assert cache.get(3, "ab" * 16) is None
    assert "unreadable" in caplog.text and "training again" in caplog.text


def message(content, message_type):
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="1",
                        created_at=0.0, ttl=60.0, message_type=message_type)
    return Message(RecordDict(content), metadata=metadata)


def test_a_node_asked_again_for_a_round_it_finished_replies_the_same_without_training(
    tiny_model_dir, toy_data_dir, tmp_path, monkeypatch
):
    run_config = {"model": str(tiny_model_dir), "model-cache-dir": str(tmp_path / "cache"), "data-dir": str(toy_data_dir),
                  "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16, "samples": 70, "max-length": 48,
                  "input-prompt-steps": 1, "gate-pretrain-steps": 2, "local-steps": 2, "min-partition-size": 2,
                  "reply-cache-dir": str(tmp_path / "replies")}
    server = Session.open(Settings.from_flat(run_config), progress=False)
    prepare_or_load(server, progress=False)
    sha = tensor_sha(server.model.input_prompts)
    store_input_prompts(server.settings, server.model.input_prompts, sha)
    trained = []
    original = Session.train
    monkeypatch.setattr(Session, "train", lambda self, ex, count, **kw: trained.append(count) or original(self, ex, count, **kw))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(),
                      run_config=run_config)
    config = ConfigRecord({"server-round": 3, "input-prompts-sha": sha, "tasks": list(server.tasks)})
    state = {k: v.cpu() for k, v in server.model.federated_state_dict().items()}

    def ask(arrays, settings=run_config):
        context.run_config = settings
        reply = client_app.train(message({"arrays": ArrayRecord(arrays), "config": config}, MessageType.TRAIN), context)
        assert not reply.has_error()
        return reply.content["arrays"].to_torch_state_dict(), dict(reply.content["metrics"])

    first = ask(state)
    assert trained == [2] and len(list((tmp_path / "replies").iterdir())) == 1
    # the server stopped before the round ended; resumed (more rounds asked for), it sends the same again
    again = ask(state, {**run_config, "num-server-rounds": 9})
    assert trained == [2]  # not trained again
    assert list(again[0]) == list(first[0]) and all(torch.equal(again[0][k], first[0][k]) for k in first[0])
    assert again[1] == first[1]
    # another global state (a resume from an older checkpoint): trained afresh
    ask({k: v + 1e-3 for k, v in state.items()})
    assert trained == [2, 2]
    # without reply-cache-dir nothing is kept or reused
    ask(state, {**run_config, "reply-cache-dir": ""})
    assert trained == [2, 2, 2]


def test_local_gates_keep_no_reply(tmp_path):
    """A kept reply would skip the update of the gate a node keeps for itself: none is kept."""
    settings = {"reply-cache-dir": str(tmp_path / "replies"), "gate-aggregation": "local"}
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 1, "num-partitions": 4}, state=RecordDict(),
                      run_config={**Settings().to_flat(), **settings})
    msg = message({"arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in STATE.items()}),
                   "config": ConfigRecord({"server-round": 1})}, MessageType.TRAIN)
    assert client_app._reply_cache(msg, context) is None
    context.run_config = {**context.run_config, "gate-aggregation": "global"}
    assert client_app._reply_cache(msg, context) is not None
