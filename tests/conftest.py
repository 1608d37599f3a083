import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests run the layers eager (fast to start, every process alike); test_compiled.py turns compiling on where it checks it.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every cache the code under test writes (models, compression, start states, activations) goes here.
os.environ["MOPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="mops-test-cache-")
torch.set_num_threads(min(2, os.cpu_count() or 1))

from helpers import tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def pretrained_base(tokenizer):
    from helpers import pretrained_tiny_base

    return pretrained_tiny_base(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer, pretrained_base):
    """The pretrained tiny base saved as a Hugging Face directory (loaded like any local model)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    pretrained_base.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_data_dir(tmp_path_factory):
    from helpers import toy_records, write_dolly

    from mops_core.data import TASKS

    path = tmp_path_factory.mktemp("data")
    write_dolly(path, toy_records(TASKS["dolly"], 30))
    return path


@pytest.fixture
def server_identity(monkeypatch):
    """What the ServerApp runtime sets in a real run, so that the server can build messages."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
