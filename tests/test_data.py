import dataclasses
import json

import pytest
from helpers import toy_records, write_dolly

from mops_core.config import DataConfig
from mops_core.labels import IGNORE_INDEX
from mops_core.data import (
    TASKS,
    DataError,
    Formatter,
    Record,
    collate,
    even_quotas,
    load_records,
    prepare,
    resolve_data_dir,
    run_tasks,
    sample_and_split,
    task_counts,
)

DOLLY = TASKS["dolly"]


def test_even_quotas_share_evenly_and_refill_from_small_tasks():
    # Dolly's creative_writing has only 709 rows: its shortfall goes to the others.
    available = {"a": 709, "b": 2000, "c": 2000, "d": 2000, "e": 2000, "f": 2000, "g": 2000}
    quotas = even_quotas(available, 5000)
    assert sum(quotas.values()) == 5000
    assert quotas["a"] == 709
    others = [quotas[t] for t in "bcdefg"]
    assert max(others) - min(others) <= 1 and sum(others) == 4291
    assert even_quotas({"a": 3, "b": 4}, 100) == {"a": 3, "b": 4}  # fewer rows than asked: take all
    assert even_quotas({"a": 10, "b": 10, "c": 10}, 7) == {"a": 3, "b": 2, "c": 2}


def test_sampling_is_even_per_task_and_the_split_is_stratified_and_deterministic():
    records = toy_records(DOLLY, per_task=40)
    cfg = DataConfig(samples=140, test_fraction=0.1, data_seed=3)
    train, test = sample_and_split(records, cfg)
    counts = task_counts(train + test)
    assert len(train) + len(test) == 140 and set(counts.values()) == {20}
    assert set(task_counts(test).values()) == {2}  # 10% of each task
    again = sample_and_split(records, cfg)
    assert (train, test) == again
    assert sample_and_split(list(reversed(records)), cfg) == (train, test), "input order must not matter"
    other = sample_and_split(records, DataConfig(samples=140, test_fraction=0.1, data_seed=4))
    assert other != (train, test)
    assert not set(train) & set(test)


def test_dolly_reader_drops_general_qa_and_reads_fields(tmp_path):
    records = toy_records(DOLLY, per_task=3) + [Record("q", "", "a", "general_qa")]
    write_dolly(tmp_path, records)
    loaded = load_records(DataConfig(data_dir=str(tmp_path)))
    assert len(loaded) == 21 and "general_qa" not in task_counts(loaded)
    assert loaded[0] == records[0]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"instruction": "x", "context": "", "response": "y"', "not valid JSON"),
        ('{"instruction": "x", "context": "", "response": "y"}', "missing field(s) category"),
        ('["a list"]', "expected a JSON object"),
        ('{"instruction": 3, "context": "", "response": "y", "category": "open_qa"}', "must be strings"),
    ],
)
def test_malformed_lines_name_the_file_and_line(tmp_path, line, problem):
    path = write_dolly(tmp_path, toy_records(DOLLY, per_task=1))
    with path.open("a") as fh:
        fh.write(line + "\n")
    with pytest.raises(DataError) as err:
        load_records(DataConfig(data_dir=str(tmp_path)))
    assert f"{path}:8:" in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_file_that_starts_with_a_byte_order_mark_is_read_as_without_one(tmp_path, suffix):
    """Windows editors and spreadsheet exports write UTF-8 with a byte-order mark first."""
    from mops_core.data import Columns, read_records

    rows = [{"instruction": f"q{i}", "context": "", "response": "a", "task": "t"} for i in range(3)]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows)
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")
    assert marked.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_records(marked, Columns()) == read_records(plain, Columns()) and len(read_records(plain, Columns())) == 3
    # a mark further down is not one: the line stays unreadable, named
    (tmp_path / "late.jsonl").write_bytes(plain.read_bytes() + b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    if suffix == ".jsonl":
        with pytest.raises(DataError, match="late.jsonl:4: not valid JSON"):
            read_records(tmp_path / "late.jsonl", Columns())


def test_every_unreadable_line_is_named_and_an_empty_file_says_so(tmp_path):
    path = write_dolly(tmp_path, toy_records(DOLLY, per_task=1))  # lines 1-7 are good
    with path.open("ab") as fh:
        fh.write(b'{"instruction": "caf\xe9", "context": "", "response": "y", "category": "open_qa"}\n')  # Latin-1, not UTF-8
        fh.write(b"\n")
        fh.write(b"42\n")
        fh.write(b'{"instruction": null, "context": "", "response": "y", "category": "open_qa"}\n')
    with pytest.raises(DataError) as err:
        load_records(DataConfig(data_dir=str(tmp_path)))
    lines = str(err.value).splitlines()
    assert lines[0] == f"3 unreadable line(s) in {path}:"
    assert lines[1] == f"{path}:8: not UTF-8 text (byte 0xe9 at column 21)"
    assert lines[2] == f"{path}:10: expected a JSON object, got int"
    assert lines[3] == f"{path}:11: field(s) instruction (NoneType) must be strings"

    path.write_text("\n\n")
    with pytest.raises(DataError, match=f"{path}: no rows"):
        load_records(DataConfig(data_dir=str(tmp_path)))
    write_dolly(tmp_path, [Record("q", "", "a", "general_qa")])
    with pytest.raises(DataError, match=r"no record of its tasks \(creative_writing.*it holds: general_qa"):
        load_records(DataConfig(data_dir=str(tmp_path)))


def test_many_bad_lines_are_listed_up_to_a_limit(tmp_path):
    path = write_dolly(tmp_path, [])
    path.write_text("not json\n" * 25)
    with pytest.raises(DataError) as err:
        load_records(DataConfig(data_dir=str(tmp_path)))
    assert str(err.value).count("not valid JSON") == 20 and str(err.value).endswith("... and 5 more bad lines")


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(DataConfig(data_dir=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no dolly data under .*databricks-dolly-15k.jsonl not found"):
        load_records(DataConfig(data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="no sni data under .*sni/task001_quoref_question_generation.jsonl"):
        load_records(DataConfig(dataset="sni", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="no-such.jsonl: no such file or folder"):
        load_records(DataConfig(dataset=str(tmp_path / "no-such.jsonl")))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no .jsonl, .ndjson, .json, .parquet file"):
        load_records(DataConfig(dataset=str(tmp_path)))


def test_sni_reader_uses_the_tasks_present(tmp_path):
    folder = tmp_path / "sni"
    folder.mkdir()
    task = TASKS["sni"][3]
    rows = [{"id": str(i), "task": task, "definition": "Add k.", "input": f"[{i}] k=1", "output": f"[{i + 1}]"} for i in range(5)]
    (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(DataConfig(dataset="sni", data_dir=str(tmp_path)))
    assert len(records) == 5 and records[0] == Record("Add k.", "[0] k=1", "[1]", task)


def test_template_labels_only_the_response(tokenizer):
    formatter = Formatter(tokenizer, max_length=200, tasks=DOLLY)
    record = Record("Say hi", "to Bob", "hi Bob", "open_qa")
    example = formatter.example(record)
    question = tokenizer.decode(example.input_ids[: example.question_len])
    response = tokenizer.decode(example.input_ids[example.question_len :])
    assert question == "<|im_start|>user\nSay hi\n\nto Bob<|im_end|>\n<|im_start|>assistant\n"
    assert response == "hi Bob<|im_end|>"
    assert example.task_id == DOLLY.index("open_qa")
    batch = collate([example], tokenizer.pad_token_id)
    labelled = batch["labels"][0] != IGNORE_INDEX
    assert labelled.sum() == example.response_len
    assert batch["question_mask"][0].sum() == example.question_len
    assert not (labelled & batch["question_mask"][0]).any()


def test_long_samples_are_cut_to_max_length_keeping_both_ends_of_the_question(tokenizer):
    formatter = Formatter(tokenizer, max_length=80, tasks=DOLLY)
    record = Record("START" + "x" * 200, "y" * 200 + "END?", "r" * 100, "closed_qa")
    example = formatter.example(record)
    assert len(example.input_ids) == 80
    assert example.response_len == 40  # half the budget goes to the response
    question = tokenizer.decode(example.input_ids[: example.question_len])
    assert "START" in question and "END?" in question and question.endswith("assistant\n")
    short = formatter.example(Record("hi", "", "r" * 100, "closed_qa"))
    assert len(short.input_ids) == 80 and short.response_len > 40  # the response takes what the question leaves


def test_collate_pads_right_and_masks(tokenizer):
    formatter = Formatter(tokenizer, max_length=100, tasks=DOLLY)
    examples = formatter.examples([Record("a", "", "b", "open_qa"), Record("longer one", "ctx", "reply", "summarization")])
    batch = collate(examples, tokenizer.pad_token_id)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(e.input_ids) for e in examples]
    assert (batch["input_ids"][0, lengths[0] :] == tokenizer.pad_token_id).all()
    assert (batch["labels"][0, lengths[0] :] == IGNORE_INDEX).all()
    questions = collate(examples, tokenizer.pad_token_id, with_response=False)
    assert questions["attention_mask"].sum(1).tolist() == [e.question_len for e in examples]
    assert (questions["labels"] == IGNORE_INDEX).all()


def test_prepare_tokenises_both_splits(tmp_path, tokenizer):
    write_dolly(tmp_path, toy_records(DOLLY, per_task=10))
    data = prepare(DataConfig(data_dir=str(tmp_path), samples=70, max_length=64), tokenizer)
    assert len(data.train) + len(data.test) == 70
    assert all(len(e.input_ids) <= 64 and e.response_len >= 1 for e in data.train + data.test)
    assert {e.task_id for e in data.test} == set(range(7))


def test_data_beside_the_working_directory_is_found_as_flwr_run_starts_the_apps(tmp_path, monkeypatch):
    """`flwr run .` runs the apps from a copy under $FLWR_HOME/apps, in the directory it was started from."""
    from mops_core.data import sources

    project, shared = tmp_path / "project", tmp_path / "shared" / "data"
    project.mkdir()
    write_dolly(shared, toy_records(DOLLY, per_task=1))
    monkeypatch.setattr(sources, "__file__", str(tmp_path / "flwr-home" / "apps" / "mops" / "mops_core" / "data" / "sources.py"))
    monkeypatch.delenv("MOPS_DATA_DIR", raising=False)
    monkeypatch.chdir(project)
    assert resolve_data_dir(DataConfig()) == shared
    monkeypatch.setenv("MOPS_DATA_DIR", str(tmp_path / "elsewhere"))
    write_dolly(tmp_path / "elsewhere", toy_records(DOLLY, per_task=1))
    assert resolve_data_dir(DataConfig()) == tmp_path / "elsewhere", "the environment comes first"


# ---------------------------------------------------------------------------- your own data

THREE = ("translate", "classify", "summarise")


def write_tasks(path, records, fields=("instruction", "context", "response", "task")):
    """Records as JSONL with the given field names (instruction, context, response, task)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in records:
            fh.write(json.dumps(dict(zip(fields, (r.instruction, r.context, r.response, r.task)))) + "\n")
    return path


def test_your_own_jsonl_gives_its_tasks_sorted_and_the_tasks_setting_chooses_and_orders_them(tmp_path, tokenizer):
    records = toy_records(THREE, per_task=10)
    path = write_tasks(tmp_path / "mine.jsonl", records)
    cfg = DataConfig(dataset=str(path), samples=30)
    assert load_records(cfg) == records
    assert run_tasks(cfg) == ("classify", "summarise", "translate")  # from the data, sorted
    data = prepare(cfg, tokenizer)
    assert data.tasks == ("classify", "summarise", "translate")
    assert {(e.task_id, r.task) for e, r in zip(data.train, data.train_records)} == {(0, "classify"), (1, "summarise"), (2, "translate")}

    chosen = DataConfig(dataset=str(path), samples=30, tasks="translate, classify")  # two of three, in this order
    assert run_tasks(chosen) == ("translate", "classify")
    assert task_counts(load_records(chosen)) == {"translate": 10, "classify": 10}
    assert {e.task_id for e in prepare(chosen, tokenizer).train if e} == {0, 1}
    with pytest.raises(DataError, match=r"tasks: rewrite not in .*mine.jsonl \(it holds: classify, summarise, translate\)"):
        load_records(DataConfig(dataset=str(path), tasks="translate,rewrite"))


def test_the_column_settings_map_any_field_names_and_a_field_the_data_lacks_is_refused_by_setting(tmp_path):
    records = toy_records(THREE, per_task=3)
    path = write_tasks(tmp_path / "mine.jsonl", records, fields=("prompt", "input", "output", "skill"))
    mapped = DataConfig(dataset=str(path), instruction_column="prompt", context_column="input",
                        response_column="output", task_column="skill")
    assert load_records(mapped) == records
    no_context = load_records(dataclasses.replace(mapped, context_column=""))
    assert [r.context for r in no_context] == [""] * 9 and [r.response for r in no_context] == [r.response for r in records]
    for setting, field in [("instruction_column", "instruction"), ("context_column", "context"),
                           ("response_column", "answer"), ("task_column", "category")]:
        with pytest.raises(DataError) as err:
            load_records(dataclasses.replace(mapped, **{setting: field}))
        assert str(err.value).startswith(f"{setting.replace('_', '-')} '{field}' is not a field of {path} (its fields: input, output, prompt, skill)")


def test_json_parquet_folders_and_saved_datasets_read_as_the_same_records(tmp_path):
    import datasets

    records = toy_records(THREE, per_task=4)
    rows = [{"instruction": r.instruction, "context": r.context, "response": r.response, "task": r.task} for r in records]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]), "test": datasets.Dataset.from_list(rows[5:])}).save_to_disk(str(tmp_path / "saved"))
    folder = tmp_path / "folder"
    write_tasks(folder / "part-1.jsonl", records[:6])
    write_tasks(folder / "sub" / "part-2.jsonl", records[6:])
    for source in ("a.json", "b.parquet", "folder"):
        assert load_records(DataConfig(dataset=str(tmp_path / source))) == records, source
    saved = load_records(DataConfig(dataset=str(tmp_path / "saved")))  # splits in name order: test, then train
    assert saved == records[5:] + records[:5]

    (tmp_path / "bad.json").write_text(json.dumps([rows[0], 7, {**rows[1], "response": 3}]))
    with pytest.raises(DataError) as err:
        load_records(DataConfig(dataset=str(tmp_path / "bad.json")))
    assert str(err.value).splitlines()[1:] == [f"{tmp_path / 'bad.json'}: item 1: expected a JSON object",
                                               f"{tmp_path / 'bad.json'}: item 2: field(s) response (int) must be strings"]
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="bad.parquet: not a readable Parquet file"):
        load_records(DataConfig(dataset=str(tmp_path / "bad.parquet")))


def sni_rows(tasks, per_task):
    return [{"id": f"{task}-{i}", "task": task, "definition": f"Do {task}.", "input": f"[{i}] {task[:8]}", "output": f"out {i}"}
            for task in tasks for i in range(per_task)]


def test_sni_from_a_saved_hub_dataset_gives_the_records_of_the_local_layout(tmp_path, monkeypatch):
    import datasets

    from mops_core.data import sources as data_module

    tasks = TASKS["sni"][:3]
    rows = sni_rows(tasks, 6)
    local = tmp_path / "local"
    for task in tasks:
        path = local / "sni" / f"{task}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["task"] == task))
    # The hub's schema (task_name, definition, inputs, targets), tasks interleaved, with tasks the run does not use.
    hub_rows = [{"task_name": r["task"], "id": r["id"], "definition": r["definition"], "inputs": r["input"], "targets": r["output"]}
                for r in reversed(rows)]
    hub_rows += [{"task_name": "task999_other", "id": "x", "definition": "d", "inputs": "i", "targets": "t"}]
    hub = tmp_path / "hub"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(hub_rows)}).save_to_disk(str(hub))

    from_local = load_records(DataConfig(dataset="sni", data_dir=str(local)))
    monkeypatch.setitem(data_module.PRESETS, "sni", dataclasses.replace(data_module.PRESETS["sni"], hub_id=str(hub)))
    monkeypatch.setattr(data_module, "default_data_dirs", lambda: [tmp_path / "nothing here"])
    from_hub = load_records(DataConfig(dataset="sni"))  # no local copy: the hub
    assert sorted(from_hub, key=repr) == sorted(from_local, key=repr) and len(from_hub) == 18
    cfg = DataConfig(dataset="sni", samples=18)
    assert sample_and_split(from_hub, cfg) == sample_and_split(from_local, cfg), "the same split, whatever the source"

    monkeypatch.setattr(data_module, "default_data_dirs", lambda: [local])
    assert load_records(DataConfig(dataset="sni")) == from_local, "a local copy wins over the hub"


def test_a_dataset_is_read_once_per_process_until_its_file_changes(tmp_path, monkeypatch):
    import mops_core.data as data
    from helpers import toy_records

    from mops_core.data import sources

    from mops_core.config import DataConfig

    path = tmp_path / "mine.jsonl"
    rows = [{"instruction": r.instruction, "context": r.context, "response": r.response, "task": r.task}
            for r in toy_records(("a", "b"), 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reads = []
    original = sources.read_records
    monkeypatch.setattr(sources, "read_records", lambda *a, **k: reads.append(a) or original(*a, **k))
    cfg = DataConfig(dataset=str(path))
    first = data.load_records(cfg)
    assert data.run_tasks(cfg) == ("a", "b") and data.load_records(cfg) == first and len(reads) == 1
    first.clear()  # a caller's list is its own
    assert len(data.load_records(cfg)) == 6
    path.write_text(path.read_text() + json.dumps({**rows[0], "task": "c"}) + "\n")
    assert data.run_tasks(cfg) == ("a", "b", "c") and len(reads) == 2
