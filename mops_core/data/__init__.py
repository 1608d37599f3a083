"""Multi-task instruction data: records, even sampling, split, template, batches.

A record is (instruction, context, response, task). Any source reduces to it through a column
mapping (`readers`): a JSONL/JSON/Parquet file or folder, a saved `datasets` folder, or a hub
dataset; the paper's Dolly 15k and Super-NaturalInstructions are presets (`sources`: a local copy
first, then the hub). The rest of the pipeline does not care where the data came from: `sampling`
draws and splits, `formatting` tokenises (question and response apart) and batches.

Reading and sampling need no torch (the launcher checks a run's data before anything heavy
starts); the formatting names load torch and transformers when first used.
"""

from .readers import DATA_SUFFIXES, Columns, names_a_path, read_jsonl, read_records
from .records import DataError, Example, Record
from .sampling import even_quotas, sample_and_split, task_counts
from .sources import PRESETS, TASKS, Preset, default_data_dirs, load_records, missing_local_copy, resolve_data_dir, run_tasks

_FORMATTING = ("PLAIN_TEMPLATE", "Formatter", "PreparedData", "collate", "pad_token_id", "prepare")

__all__ = [
    "DATA_SUFFIXES", "Columns", "names_a_path", "read_jsonl", "read_records", "DataError", "Example", "Record", "even_quotas",
    "sample_and_split", "task_counts", "PRESETS", "TASKS", "Preset", "default_data_dirs", "load_records",
    "missing_local_copy", "resolve_data_dir", "run_tasks", *_FORMATTING,
]


def __getattr__(name: str):
    if name in _FORMATTING:
        from . import formatting

        return getattr(formatting, name)
    raise AttributeError(f"module 'mops_core.data' has no attribute {name!r}")
