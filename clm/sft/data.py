"""Finetuning records: where they come from (local JSON lines or a Hub dataset), their three
formats, their checks, the held-out split, and the block size read from the model.

    python finetune/run_sft.py --model_name_or_path gpt2 --train_files data.jsonl --output_dir out/sft

Records are `{"text"}`, `{"prompt", "completion"}` or `{"messages": [{"role", "content"}]}`
(the format is read from the columns). A record is held out by a hash of its content
(`--validation_split_percentage`) unless `--validation_files` are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import _help
from ..data import BUILDERS, is_heldout, resolve_files
from ..errors import UsageError, first_line
from ..model import check_block_size

FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"),
           "text": ("text",)}


@dataclass
class SFTDataConfig:
    """Where the finetuning records come from and how they become batches."""

    train_files: Optional[list[str]] = _help("Local .jsonl/.json/.parquet records (globs).",
                                             default=None)
    dataset_name: Optional[str] = _help("Hub dataset of records, instead of --train_files.",
                                        default=None)
    dataset_config_name: Optional[str] = _help("Configuration of --dataset_name.", default=None)
    validation_files: Optional[list[str]] = _help(
        "Held-out records (globs); else a hash carve of --validation_split_percentage.",
        default=None)
    validation_split_percentage: float = _help(
        "Percent of the records held out for evaluation when there are no validation files.",
        default=5.0)
    block_size: Optional[int] = _help(
        "Longest example (or packed sequence) in tokens; longer ones are truncated (default: "
        "the model's context length, at most 1024).", default=None)
    packing: bool = _help(
        "Pack several examples into each sequence of --block_size tokens, as TRL's packing: "
        "position ids restart at each example and attention stays within it, so no example "
        "sees another; fewer pad tokens, more examples per step.", default=False)
    completion_only_loss: bool = _help("Learn only completions and assistant turns (false: "
                                       "every token).", default=True)
    tokenizer_name: Optional[str] = _help("Tokenizer (default: --model_name_or_path's).",
                                          default=None)

    def __post_init__(self):
        if not self.train_files and not self.dataset_name:
            raise UsageError("no finetuning data (pass --train_files records.jsonl or "
                             "--dataset_name)")
        if self.block_size is not None and self.block_size < 2:
            raise UsageError(f"--block_size must be >= 2 (got {self.block_size})")
        if not 0 <= self.validation_split_percentage < 100:
            raise UsageError("--validation_split_percentage must be in [0, 100)")


def resolve_block_size(cfg: SFTDataConfig, model_name_or_path: str) -> int:
    """--block_size, or the model's context length (at most 1024) when it is not given, as
    HF's run_clm does; read from the model's config alone, before its weights load. An explicit
    value above the context is an error."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except Exception as e:
        first = first_line(e)
        raise UsageError(f"could not load --model_name_or_path {model_name_or_path}: {first} "
                         "(pass a Hub name or a folder with a model)") from None
    context = getattr(config, "n_positions", None) or \
        getattr(config, "max_position_embeddings", None)
    if cfg.block_size is None:
        cfg.block_size = min(int(context or 1024), 1024)
    else:
        check_block_size(config, cfg.block_size)
    return cfg.block_size



# ----------------------------------------------------------------------------- records

def load_records(cfg: SFTDataConfig, split: str = "train") -> list[dict]:
    """The records of `split` ("train" or "validation") as dicts."""
    import datasets
    from datasets import load_dataset

    files = cfg.validation_files if split == "validation" else cfg.train_files
    option = f"--{split}_files"
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a small in-memory load: its bars are noise on stderr
    try:
        if files:
            names, builder = resolve_files(files, option)
            if builder == BUILDERS[".txt"]:
                raise UsageError(f"{option}: finetuning records must be .jsonl, .json "
                                 "or .parquet (one record a line or row)")
            for name in names:
                if name.endswith(".jsonl"):  # checked line by line, so errors name the line
                    _check_jsonl(name, option)
            ds = load_dataset(builder, data_files=names, split="train")
        else:
            ds = load_dataset(cfg.dataset_name, cfg.dataset_config_name, split=split)
    except UsageError:
        raise
    except Exception as e:
        first = first_line(e)
        raise UsageError(f"could not load the {split} records: {first} (check --train_files "
                         "or --dataset_name)") from None
    finally:
        if bars:
            datasets.enable_progress_bars()
    record_format(ds.column_names)
    records = list(ds)
    where = f"{option} {', '.join(names)}" if files else f"--dataset_name {cfg.dataset_name}"
    for i, record in enumerate(records):
        check_record(record, f"{where} record {i + 1}")
    return records


RECORD_FIX = ('each record is {"text": str}, {"prompt": str, "completion": str} or '
              '{"messages": [{"role": str, "content": str}, ...]}')


def check_record(record, where: str) -> None:
    """One-line UsageError naming `where` unless `record` is one of the three formats."""
    if not isinstance(record, dict):
        raise UsageError(f"{where}: not a JSON object ({RECORD_FIX})")
    if record.get("messages") is not None:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise UsageError(f"{where}: 'messages' must be a non-empty list of "
                             f"{{\"role\": str, \"content\": str}} objects ({RECORD_FIX})")
    elif record.get("prompt") is not None or record.get("completion") is not None:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise UsageError(f"{where}: '{key}' must be a string ({RECORD_FIX})")
    elif not isinstance(record.get("text"), str):
        raise UsageError(f"{where}: the record has columns {sorted(record)} ({RECORD_FIX})")


def _check_jsonl(path: str, option: str) -> None:
    import json

    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UsageError(f"{option} {path} line {n}: not valid JSON "
                                 f"({getattr(e, 'msg', e)}; each line must be one JSON "
                                 "record)") from None
            check_record(record, f"{option} {path} line {n}")


def record_format(columns) -> str:
    for name, needed in FORMATS.items():
        if all(c in columns for c in needed):
            return name
    raise UsageError(f"records have columns {sorted(columns)} (each record needs 'text', "
                     "'prompt' and 'completion', or 'messages')")


def split_records(cfg: SFTDataConfig) -> tuple[list[dict], list[dict]]:
    """(train, held-out) records: validation files, else a deterministic hash carve."""
    records = load_records(cfg)
    if cfg.validation_files:
        return records, load_records(cfg, "validation")
    if not cfg.validation_split_percentage:
        return records, []
    train, held = [], []
    for r in records:  # by content, so a record stays on its side however the file is ordered
        (held if is_heldout(repr(sorted(r.items())), cfg.validation_split_percentage)
         else train).append(r)
    return train, held
