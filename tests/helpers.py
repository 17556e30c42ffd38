"""Helpers shared by the tests that run train_clm.main on a toy model."""

import json
from pathlib import Path

import train_clm
from clm.config import DataConfig, ModelConfig, TrainingConfig, run_cli

ROOT = Path(__file__).resolve().parents[1]
TYPES = [DataConfig, ModelConfig, TrainingConfig]


def toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, **overrides):
    """train_clm.py arguments for a 2-layer, 64-dim model on the test corpus; override any."""
    args = {"dataset_name": corpus_dir, "tokenizer_name": tokenizer_dir,
            "config_name": toy_config_dir, "output_dir": out, "block_size": 32,
            "validation_split_percentage": 10, "dataloader_num_workers": 0,
            "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
            "max_steps": 6, "eval_steps": 3, "logging_steps": 1, "warmup_steps": 2,
            "learning_rate": 3e-3, "min_lr": 3e-4, "num_samples": 2,
            "sample_max_new_tokens": 8, "seed": 0}
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def run(argv):
    """train_clm.py in this process (the real main, through the real CLI parser)."""
    return run_cli(train_clm.main, TYPES, argv)


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def reset_accelerate():
    """A new Accelerator in this process starts from scratch, as in a fresh process."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
