"""Finetuning's data path, one module per concern; run_sft.py and the tests use the names below.

    python finetune/run_sft.py --config configs/sft_demo.yaml

    data.py       records: sources, formats, checks, the held-out split, the block size
    templates.py  records into token ids and labels: chat template, completion-only loss mask
    batches.py    padded or packed micro-batches dealt to ranks (ExampleLoader, resumable)
    lora.py       LoRA adapters: checked, added, merged

Generation-based evaluation of held-out prompts (`--eval_metrics`) is clm/task_eval.py.
"""

from .batches import ExampleLoader, collate, collate_packed, eval_batches, pack
from .data import (FORMATS, RECORD_FIX, SFTDataConfig, check_record, load_records,
                   record_format, resolve_block_size, split_records)
from .lora import GPT2_LORA_TARGETS, LoraArgs, add_lora, check_lora_targets, merge_lora
from .templates import DEFAULT_CHAT_TEMPLATE, ensure_chat_template, segments, tokenize

__all__ = ["DEFAULT_CHAT_TEMPLATE", "FORMATS", "GPT2_LORA_TARGETS", "RECORD_FIX",
           "ExampleLoader", "LoraArgs", "SFTDataConfig", "add_lora", "check_lora_targets",
           "check_record", "collate", "collate_packed", "ensure_chat_template", "eval_batches",
           "load_records", "merge_lora", "pack", "record_format", "resolve_block_size",
           "segments", "split_records", "tokenize"]
