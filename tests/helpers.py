"""Tiny, offline stand-ins for the real thing: a character tokenizer, random LLaMA bases, toy tasks."""

from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mops_core.config import Settings
from mops_core.data import Record

SPECIALS = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, plus ChatML-style specials (like SmolLM2's)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [c for c in string.printable if c not in "\r\x0b\x0c"])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_base(vocab_size: int, *, layers: int = 4, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    return model.requires_grad_(False).eval()


def toy_records(tasks: tuple[str, ...], per_task: int, seed: int = 0) -> list[Record]:
    """Tasks that differ in instruction alphabet and in what the response does with the input."""
    rng = random.Random(seed)
    alphabets = ["abcdefgh", "ijklmnop", "qrstuvwx", "ABCDEFGH", "IJKLMNOP", "QRSTUVWX", "0123456789"]
    records = []
    for t, task in enumerate(tasks):
        letters = alphabets[t % len(alphabets)]
        for _ in range(per_task):
            word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 10)))
            context = "".join(rng.choice(letters) for _ in range(rng.randint(0, 6)))
            response = [word[::-1], word.upper(), word + word, word[:3], word.lower(), word[1:], word][t % 7]
            records.append(Record(f"{letters[:3]} {word}", context, response, task))
    return records


def write_dolly(folder: Path, records: list[Record]) -> Path:
    path = folder / "dolly" / "databricks-dolly-15k.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps({"instruction": r.instruction, "context": r.context, "response": r.response, "category": r.task}) + "\n")
    return path


def tiny_run_settings(model: Path, data: Path, cache: Path, flat: dict) -> dict:
    """Flat settings of a federated run on the tiny LLaMA and the toy data, small enough that a loopback
    deployment (real SuperLink and SuperNodes) trains a round in seconds; `flat` adds or overrides."""
    return {
        "model": str(model), "data-dir": str(data), "model-cache-dir": str(cache),
        "prompts-per-expert": 2, "inject-layer": 2, "gate-hidden": 16, "samples": 140, "max-length": 64,
        "input-prompt-steps": 2, "gate-pretrain-steps": 10, "eval-samples": 8, "min-partition-size": 5,
        "fraction-train": 1.0, **flat,
    }


def tiny_settings(**flat) -> Settings:
    defaults = {
        "experts": 3,
        "prompts-per-expert": 2,
        "inject-layer": 2,
        "gate-hidden": 16,
        "samples": 60,
        "max-length": 64,
        "steps": 10,
        "input-prompt-steps": 2,
        "gate-pretrain-steps": 20,
        "gate-pretrain-samples": 32,
        "eval-batch-size": 4,
    }
    defaults.update(flat)
    return Settings.from_flat(defaults)


def pretrained_tiny_base(tokenizer, *, steps: int = 300, seed: int = 0) -> LlamaForCausalLM:
    """A tiny LLaMA that has learnt the toy language a little: prompts can steer it, as on a real LM.

    Trained on tasks 3..6 of the toy data; tests tune prompts for tasks 0..2.
    """
    from mops_core.data import TASKS, Formatter, collate

    base = tiny_base(len(tokenizer), seed=seed)
    base.requires_grad_(True).train()
    formatter = Formatter(tokenizer, 64, TASKS["dolly"])
    examples = formatter.examples(toy_records(TASKS["dolly"][3:], 100, seed=9))
    optimizer = torch.optim.AdamW(base.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for _ in range(steps):
        batch = collate(rng.sample(examples, 16), tokenizer.pad_token_id)
        sink = torch.full((16, 1), tokenizer.bos_token_id)
        ids = torch.cat([sink, batch["input_ids"]], 1)
        mask = torch.cat([torch.ones_like(sink), batch["attention_mask"]], 1)
        labels = ids.masked_fill(mask == 0, -100)
        base(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return base.requires_grad_(False).eval()


def pretrained_tiny_base_key() -> str:
    """What `pretrained_tiny_base` learns depends on: this file (the model, the toy data, the loop), the
    formatting and batching it trains on, and the library versions; a copy trained under another key
    is never used."""
    import inspect

    import transformers

    from mops_core.data import Formatter, collate

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    for source in sorted({__file__, inspect.getsourcefile(Formatter), inspect.getsourcefile(collate)}):
        digest.update(Path(source).read_bytes())
    return digest.hexdigest()[:16]


def tensorboard_events(folder):
    """What TensorBoard's own reader finds in a run's event files: {tag: [(step, value)]}, the text and
    image tags, and the hparams plugin's tags (a run in the hparams table has them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags["scalars"]}
    try:
        hparams = sorted(events.PluginTagToContent("hparams"))
    except KeyError:  # no run of this folder is in the hparams table
        hparams = []
    return {"scalars": scalars, "images": tags["images"], "tensors": tags["tensors"], "hparams": hparams}
