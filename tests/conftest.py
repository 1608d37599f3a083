import os
import sys
import tempfile
from pathlib import Path

import pytest

# Tests run the layers eager (fast to start, every process alike); test_compiled.py turns compiling on where it checks it.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every cache the code under test writes (models, compression, start states, activations) goes here.
os.environ["MOPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="mops-test-cache-")
# One thread: the tests' tiny models gain nothing from a second one, and a thread pool whose other
# thread is descheduled (other work on the cores) makes every small op wait for it, ten times slower.
torch.set_num_threads(1)

from helpers import tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def pretrained_base(tokenizer, pytestconfig):
    """The tiny LLaMA that has learnt the toy language, trained once and kept in pytest's cache
    (`.pytest_cache/`) under a key of the code and versions that make it, so the edit-test loop
    does not train it again; `pytest -p no:cacheprovider` or `--cache-clear` trains it afresh."""
    from helpers import pretrained_tiny_base, pretrained_tiny_base_key

    from mops_core import atomic

    cache = getattr(pytestconfig, "cache", None)
    if cache is None:
        return pretrained_tiny_base(tokenizer)
    folder = cache.mkdir(f"tiny-llama-{pretrained_tiny_base_key()}")
    if (folder / "config.json").exists():
        try:
            return LlamaForCausalLM.from_pretrained(folder, attn_implementation="sdpa").requires_grad_(False).eval()
        except (OSError, ValueError) as e:  # a half-written or damaged copy: train it again
            print(f"the cached tiny LLaMA in {folder} does not load ({e}); training it again")
    base = pretrained_tiny_base(tokenizer)
    with atomic.directory(folder) as tmp:
        base.save_pretrained(tmp)
    return base


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
