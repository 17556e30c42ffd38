"""Typed run configuration: one dataclass per concern, driven by the CLI and `--config x.yaml`.

    python train_clm.py --config configs/demo_cpu.yaml --max_steps 50   # CLI wins over the YAML

Each field's help text lives in its `metadata` and shows in `--help`; checks live in
`__post_init__` and raise `UsageError`, which the entry points print as one line
`error: <what> (<how to fix>)` with exit code 2, before any work starts.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import yaml

from .errors import TrainingError, UsageError  # re-exported: scripts and tests import them here


# --optim's values; clm/optim.py implements each (a test holds the two together)
OPTIM_CHOICES = ("adamw_torch", "adamw_torch_fused", "muon")
# --lr_scheduler_type's values (clm/optim.py: lr_at), and the settings each takes
SCHEDULES = {"cosine_with_min_lr": (), "cosine": (), "linear": (), "constant_with_warmup": (),
             "warmup_stable_decay": ("num_decay_steps", "decay_ratio", "decay_type")}
DECAY_TYPES = ("linear", "cosine", "1-sqrt")


def _schedule_kwargs(kind: str, given) -> dict:
    """--lr_scheduler_kwargs as a dict, checked against --lr_scheduler_type."""
    import json

    if kind not in SCHEDULES:
        raise UsageError(f"unknown --lr_scheduler_type '{kind}' (choose {', '.join(SCHEDULES)})")
    if isinstance(given, str):
        try:
            given = json.loads(given)
        except ValueError:
            raise UsageError(f"--lr_scheduler_kwargs {given!r} is not JSON (pass e.g. "
                             "'{\"decay_ratio\": 0.2}')") from None
    given = dict(given or {})
    unknown = sorted(set(given) - set(SCHEDULES[kind]))
    if unknown:
        raise UsageError(f"--lr_scheduler_kwargs {unknown} are not settings of {kind} "
                         f"(it takes {', '.join(SCHEDULES[kind]) or 'none'})")
    if "num_decay_steps" in given and "decay_ratio" in given:
        raise UsageError("--lr_scheduler_kwargs gives both num_decay_steps and decay_ratio "
                         "(keep one)")
    if given.get("decay_type", "linear") not in DECAY_TYPES:
        raise UsageError(f"--lr_scheduler_kwargs decay_type '{given['decay_type']}' is unknown "
                         f"(choose {', '.join(DECAY_TYPES)})")
    if not 0 < given.get("decay_ratio", 0.2) <= 1 or given.get("num_decay_steps", 1) < 1:
        raise UsageError("--lr_scheduler_kwargs: decay_ratio must be in (0, 1] and "
                         "num_decay_steps >= 1")
    return given


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class DataConfig:
    """Where text comes from and how it becomes packed blocks of tokens."""

    dataset_name: Optional[str] = _help(
        "Hub dataset (parquet, no loading script) or a local folder laid out like one. "
        "Ignored when --train_files is given.", default="Skylion007/openwebtext")
    dataset_config_name: Optional[str] = _help("Hub dataset configuration name.", default=None)
    dataset_revision: Optional[str] = _help("Hub dataset revision (branch, tag or commit) to pin.",
                                            default=None)
    train_files: Optional[list[str]] = _help(
        "Local training files: one or more globs of .txt (one document per file), .jsonl or "
        ".parquet.", default=None)
    validation_files: Optional[list[str]] = _help(
        "Local held-out files (same formats), evaluated in full.", default=None)
    text_column: str = _help("Column holding the document text.", default="text")
    streaming: bool = _help(
        "Stream the data: nothing is downloaded or tokenized in full before step 1.", default=True)
    tokenizer_name: Optional[str] = _help(
        "Tokenizer: a Hub name (e.g. gpt2) or a local folder (the demo trains its own).",
        default=None)
    block_size: int = _help("Tokens per training sequence (packed, documents joined by EOS).",
                            default=1024)
    validation_split_tokens: int = _help(
        "Size of the held-out set in tokens when it is carved from the training data or taken "
        "from the dataset's own validation split.", default=1_048_576)
    validation_split_percentage: float = _help(
        "Percentage of documents, chosen by a hash of their text, held out of training when no "
        "validation files or split exist.", default=1.0)
    shuffle: bool = _help(
        "Shuffle shard order each epoch and documents within each window (resumable exactly).",
        default=True)
    shuffle_window: int = _help(
        "Documents read and shuffled together (taken evenly from --shuffle_readers places). "
        "Wider windows mix a corpus stored in topical order better (see the README's "
        "Performance section for what it did on the demo corpus). "
        "Memory: the window's text and tokens per DataLoader worker (4096 OpenWebText "
        "documents: ~40 MB); a resume re-reads at most one window.", default=4096)
    shuffle_buffer_blocks: int = _help(
        "Packed blocks permuted together before they are cut into micro-batches, so that a "
        "micro-batch holds blocks of many documents rather than consecutive pieces of a few, "
        "and the first steps sample the whole window rather than its first documents (1: "
        "stream order). Memory: 2 x N x block_size x 4 bytes per DataLoader worker per rank "
        "(8192 x 1024 tokens: 64 MiB); the first step waits for N blocks to be read and "
        "tokenized, and a resume re-reads at most 2 x N blocks.", default=8192)
    shuffle_readers: int = _help(
        "Groups of shards (parquet row groups) each worker reads side by side when shuffling, so "
        "that the documents shuffled together come from that many places in the dataset, not "
        "from one stretch of it (capped by the shards each worker has). Memory: one row group "
        "per reader in flight.", default=32)
    dataloader_num_workers: int = _help(
        "DataLoader worker processes that read and tokenize ahead of the training loop.",
        default=1)

    def __post_init__(self):
        if not self.train_files and not self.dataset_name:
            raise UsageError("no training data (pass --train_files GLOB or --dataset_name NAME)")
        if self.block_size < 2:
            raise UsageError(f"--block_size {self.block_size} is too small (use at least 2)")
        if self.validation_split_tokens < 0:
            raise UsageError("--validation_split_tokens must be >= 0")
        if not 0 <= self.validation_split_percentage < 100:
            raise UsageError(f"--validation_split_percentage {self.validation_split_percentage} "
                             "is out of range (use a value in [0, 100))")
        if self.shuffle_window < 1:
            raise UsageError("--shuffle_window must be >= 1")
        if self.shuffle_readers < 1:
            raise UsageError(f"--shuffle_readers {self.shuffle_readers} must be >= 1 "
                             "(1 reads each worker's shards one after another)")
        if self.shuffle_buffer_blocks < 1:
            raise UsageError(f"--shuffle_buffer_blocks {self.shuffle_buffer_blocks} must be >= 1 "
                             "(1 keeps stream order; 8192 is the default)")
        if self.dataloader_num_workers < 0:
            raise UsageError("--dataloader_num_workers must be >= 0")


PRESETS = ("tiny", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


@dataclass
class ModelConfig:
    """Which model to build or load."""

    model_preset: str = _help(f"Architecture to train from scratch: one of {', '.join(PRESETS)}.",
                              default="gpt2")
    config_name: Optional[str] = _help(
        "Folder (or Hub name) with a config.json to train from scratch instead of a preset.",
        default=None)
    model_name_or_path: Optional[str] = _help(
        "Start from these pretrained weights (continued pretraining) instead of from scratch.",
        default=None)
    attn_implementation: str = _help("sdpa (default), eager or flash_attention_2.",
                                     default="sdpa")
    untie_word_embeddings: bool = _help(
        "From scratch: give the model its own output head instead of reusing the token "
        "embedding (the config's tie_word_embeddings false; 38.6M more parameters at 124M).",
        default=False)
    zero_init_head: bool = _help(
        "With --untie_word_embeddings: start the output head at zero (modded-nanogpt's "
        "choice: every logit 0, a uniform prediction, at step 0).", default=False)

    def __post_init__(self):
        if self.zero_init_head and not self.untie_word_embeddings:
            raise UsageError("--zero_init_head needs --untie_word_embeddings (a tied head is the "
                             "token embedding, which cannot start at zero)")
        if self.untie_word_embeddings and self.model_name_or_path:
            raise UsageError("--untie_word_embeddings applies to a model trained from scratch; "
                             f"--model_name_or_path {self.model_name_or_path} keeps the head its "
                             "config has (drop --untie_word_embeddings)")
        if self.model_preset not in PRESETS:
            raise UsageError(f"unknown --model_preset '{self.model_preset}' "
                             f"(choose one of {', '.join(PRESETS)})")
        if self.attn_implementation not in ("sdpa", "eager", "flash_attention_2"):
            raise UsageError(f"unknown --attn_implementation '{self.attn_implementation}' "
                             "(choose sdpa, eager or flash_attention_2)")
        # Whether a GPU is there is checked where the model is built (model.build_model): a
        # --dry_run plans for GPUs from a machine that may have none.
        if self.attn_implementation == "flash_attention_2" and \
                importlib.util.find_spec("flash_attn") is None:
            raise UsageError("--attn_implementation flash_attention_2 needs the flash-attn "
                             "package, which is not installed (pip install flash-attn on a "
                             "CUDA machine, or --attn_implementation sdpa)")


@dataclass
class TrainingConfig:
    """The optimisation loop, its logging and its outputs. Names follow TrainingArguments."""

    output_dir: Optional[str] = _help("Where the model, metrics and checkpoints go (required).",
                                      default=None)
    overwrite_output_dir: bool = _help("Allow writing into the folder of another finished run.",
                                       default=False)
    per_device_train_batch_size: int = _help("Sequences per micro-batch per device.", default=8)
    per_device_eval_batch_size: int = _help("Sequences per evaluation batch per device.",
                                            default=8)
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate (after warmup).", default=6e-4)
    min_lr: float = _help("Learning rate at the end of the decay (cosine_with_min_lr and "
                          "warmup_stable_decay).", default=6e-5)
    warmup_steps: int = _help("Optimizer steps of linear warmup from 0.", default=100)
    lr_scheduler_type: str = _help(
        "The schedule after warmup (TrainingArguments' names): cosine_with_min_lr (cosine to "
        "--min_lr), cosine (to 0), linear (to 0), constant_with_warmup, or "
        "warmup_stable_decay (constant, then a decay to --min_lr over the last steps).",
        default="cosine_with_min_lr")
    lr_scheduler_kwargs: Optional[str] = _help(
        "JSON (or a YAML mapping) of the schedule's settings. warmup_stable_decay: "
        "num_decay_steps (or decay_ratio, the share of --max_steps; default 0.2) and "
        "decay_type linear, cosine or 1-sqrt (default linear).", default=None)
    optim: str = _help(
        "Optimizer (clm/optim.py; TrainingArguments' names): adamw_torch (torch's AdamW, fused "
        "where the backend allows), adamw_torch_fused (the fused kernel or an error), or muon "
        "(torch.optim.Muon on the transformer blocks' weight matrices, AdamW on embeddings, "
        "head, norms and biases).", default="adamw_torch")
    muon_lr_ratio: float = _help(
        "--optim muon: Muon's peak rate is --learning_rate times this (its update RMS is matched "
        "to AdamW's, so 1 carries AdamW's rate over; bench/learning_efficiency.py tunes it).",
        default=1.0)
    muon_learning_rate: Optional[float] = _help(
        "--optim muon: Muon's peak rate itself, instead of --muon_lr_ratio (the same schedule, "
        "scaled by muon_learning_rate / learning_rate).", default=None)
    muon_momentum: float = _help("--optim muon: Muon's momentum.", default=0.95)
    muon_nesterov: bool = _help("--optim muon: Nesterov momentum (the update looks one "
                                "momentum step ahead).", default=True)
    muon_momentum_warmup_steps: int = _help(
        "--optim muon: raise Muon's momentum linearly from 0.85 to --muon_momentum over this "
        "many steps (0: constant).", default=0)
    muon_split_qkv: bool = _help(
        "--optim muon: orthogonalise a fused QKV matrix (GPT-2's c_attn) as three matrices "
        "instead of one.", default=False)
    muon_ns_steps: int = _help("--optim muon: Newton-Schulz iterations per update.", default=5)
    weight_decay: float = _help("Decoupled weight decay, on matrices only (AdamW's and Muon's).",
                                default=0.1)
    adam_beta1: float = _help("AdamW beta1.", default=0.9)
    adam_beta2: float = _help("AdamW beta2.", default=0.95)
    adam_epsilon: float = _help("AdamW epsilon.", default=1e-8)
    max_grad_norm: float = _help("Clip the global gradient norm to this (0: no clipping).",
                                 default=1.0)
    max_steps: int = _help("Optimizer steps to train for.", default=1000)
    logging_steps: int = _help("Log training metrics every N optimizer steps.", default=10)
    eval_steps: int = _help("Evaluate on the whole held-out set every N steps (and at the end; "
                            "0: only at the end).", default=200)
    save_steps: int = _help("Save a full checkpoint every N optimizer steps (0: only when "
                            "stopped by SIGTERM/SIGINT).", default=0)
    save_total_limit: Optional[int] = _help(
        "Keep at most N checkpoints (the newest complete one is never deleted).", default=None)
    resume_from_checkpoint: Optional[str] = _help(
        "'latest' (newest complete checkpoint in output_dir), a checkpoints/step-N folder, or "
        "'auto' (latest if output_dir has a complete checkpoint, else a new run): continue that "
        "run exactly. A restart by torchrun's agent (--max-restarts) of the launch that wrote "
        "output_dir resumes from its newest complete checkpoint without this.", default=None)
    seed: int = _help("Seed for initialisation, data order and sampling.", default=1337)
    mixed_precision: Optional[str] = _help(
        "no, bf16 (autocast, fp32 master weights) or fp16. Default: the launcher's (`accelerate "
        "launch --mixed_precision`, or mixed_precision in its config file), else no; given both, "
        "they must agree. run_config.yaml records the precision the run used.", default=None)
    fsdp: str = _help(
        "full_shard: FSDP2, every transformer block's parameters, gradients and optimizer states "
        "sharded over the processes (as ZeRO-3); mixed precision from --mixed_precision. "
        "Also chosen by accelerate_configs/fsdp.yaml.", default="")
    gradient_checkpointing: bool = _help(
        "Recompute each transformer block's activations in the backward pass instead of keeping "
        "them: about a third more compute for a fraction of the activation memory (see "
        "--dry_run); losses and gradients are unchanged.", default=False)
    torch_compile: bool = _help("Compile the model (in place) and its loss with torch.compile.",
                                default=False)
    deepspeed: Optional[str] = _help(
        "DeepSpeed JSON config (ds_configs/zero3.json, ...); its \"auto\" values are filled from "
        "this run's options. `accelerate launch --config_file accelerate_configs/deepspeed_*.yaml` "
        "sets it too.", default=None)
    ddp_timeout: int = _help(
        "Seconds a collective waits for the other processes before the run fails (the process "
        "group's timeout, under DDP, FSDP and DeepSpeed alike): raise it where one rank can be "
        "busy alone for longer, e.g. tokenizing or saving a large checkpoint.", default=1800)
    step_timeout: Optional[float] = _help(
        "Seconds without a completed optimizer step after which a rank counts as hung: it "
        "writes its Python stacks to output_dir/hang-rank<R>.txt, prints one line (rank, step, "
        "what it was doing) and exits 124, so torchrun stops or restarts the job. Default: 20 x "
        "the median step time, at least 600 s (the first step, evaluations and checkpoints get "
        "at least that too); 0: off.", default=None)
    max_bad_steps: int = _help("Stop after this many optimizer steps in a row with a NaN/inf "
                               "loss or gradient (each one is skipped).", default=5)
    loss_spike_factor: float = _help(
        "Log a loss-spike event (metrics.jsonl, the progress line, the trackers) when a step's "
        "loss is over this many times the median of the last 50 steps' losses; 0: off. Only "
        "reported: rolling back past one stays yours (--resume_from_checkpoint step-N).",
        default=2.0)
    report_to: str = _help("none, wandb, tensorboard or all (through Accelerate's trackers).",
                           default="none")
    run_name: Optional[str] = _help("Tracker run name (default: the output folder's name).",
                                    default=None)
    num_samples: int = _help("Texts sampled from the final model into samples.txt.", default=3)
    sample_max_new_tokens: int = _help("Tokens per sample.", default=64)
    sample_prompt: str = _help("Prompt the samples start from.", default="The")

    push_to_hub: bool = _help("Push checkpoints and the final model to the Hub (token from "
                              "HF_TOKEN or `hf auth login`).", default=False)
    hub_model_id: Optional[str] = _help("Hub repo to push to, as user/name.", default=None)
    hub_private_repo: bool = _help("Create the Hub repo as private.", default=False)
    hub_strategy: str = _help("every_save: each checkpoint on its own branch step-N, and the "
                              "final model on main; end: only the final model.",
                              default="every_save")
    license: Optional[str] = _help("License for the model card's metadata (e.g. mit).",
                                   default=None)

    dry_run: bool = _help(
        "Print the plan and exit 0, writing nothing: parameters, FLOPs and tokens per step, "
        "per-GPU memory (GiB) for this backend (DDP, --deepspeed ZeRO stage, FSDP), whether it "
        "fits --dry_run_gpu_memory_gb and what would, and hours to --max_steps. Reads no data and "
        "loads no tokenizer or weights (shapes come from the preset or a local config).",
        default=False)
    dry_run_gpu: Optional[str] = _help(
        "GPU the plan is for, as torch.cuda.get_device_name names it (a key of "
        "clm.metrics.PEAK_FLOPS). Default: this machine's GPU if listed there, else "
        "'NVIDIA H100 80GB HBM3'.", default=None)
    dry_run_gpu_memory_gb: Optional[float] = _help(
        "Memory of one GPU for the plan, in GiB. Default: this machine's GPU's, else 80.",
        default=None)
    dry_run_mfu: float = _help(
        "Model FLOPs utilisation the plan assumes for its time estimate, in (0, 1].",
        default=0.4)
    dry_run_num_gpus: Optional[int] = _help(
        "GPUs (processes) in all the plan is for. Default: the launch's world size (WORLD_SIZE), "
        "else 1.", default=None)

    def global_batch(self, dp_world_size: int) -> int:
        """Sequences per optimizer step over `dp_world_size` data-parallel ranks: the one
        place it is computed (the fingerprint, DeepSpeed's train_batch_size, run_config.yaml,
        the planner)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * \
            dp_world_size

    def __post_init__(self):
        if self.push_to_hub and not self.hub_model_id:
            raise UsageError("--push_to_hub needs --hub_model_id (pass --hub_model_id user/name)")
        if self.hub_strategy not in ("every_save", "end"):
            raise UsageError(f"unknown --hub_strategy '{self.hub_strategy}' "
                             "(choose every_save or end)")
        if not self.output_dir:
            raise UsageError("--output_dir is required (pass --output_dir DIR)")
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "max_steps", "logging_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UsageError(f"--{name} must be >= 1 (got {getattr(self, name)})")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise UsageError("--save_total_limit must be >= 1 (the newest checkpoint is kept)")
        for name in ("warmup_steps", "eval_steps", "save_steps", "max_grad_norm",
                     "weight_decay", "num_samples"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise UsageError(f"--min_lr {self.min_lr} must be between 0 and --learning_rate "
                             f"{self.learning_rate}")
        self.lr_scheduler_kwargs = _schedule_kwargs(self.lr_scheduler_type,
                                                    self.lr_scheduler_kwargs)
        if self.optim not in OPTIM_CHOICES:
            raise UsageError(f"unknown --optim '{self.optim}' (choose "
                             f"{', '.join(OPTIM_CHOICES)})")
        self._check_muon()
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise UsageError(f"unknown --mixed_precision '{self.mixed_precision}' "
                             "(choose no, bf16 or fp16)")
        if self.report_to not in ("none", "wandb", "tensorboard", "all"):
            raise UsageError(f"unknown --report_to '{self.report_to}' "
                             "(choose none, wandb, tensorboard or all)")
        if self.step_timeout is not None and self.step_timeout < 0:
            raise UsageError(f"--step_timeout must be >= 0 seconds, 0 for off (got "
                             f"{self.step_timeout})")
        if self.max_bad_steps < 1:
            raise UsageError("--max_bad_steps must be >= 1")
        if self.loss_spike_factor != 0 and not self.loss_spike_factor > 1:
            raise UsageError(f"--loss_spike_factor must be > 1, or 0 for off (got "
                             f"{self.loss_spike_factor})")
        if self.ddp_timeout <= 0:
            raise UsageError(f"--ddp_timeout must be > 0 seconds (got {self.ddp_timeout})")
        if self.deepspeed and not os.path.isfile(self.deepspeed):
            raise UsageError(f"--deepspeed {self.deepspeed}: no such file (pass a JSON config such "
                             "as ds_configs/zero2.json)")
        self.fsdp = " ".join(self.fsdp.split()).removesuffix(" auto_wrap")
        if self.fsdp not in ("", "full_shard"):
            raise UsageError(f"unknown --fsdp '{self.fsdp}' (the supported mode is full_shard; "
                             "for other ZeRO stages use --deepspeed)")
        if self.fsdp and self.deepspeed:
            raise UsageError("--fsdp and --deepspeed both given (choose one)")
        self._check_dry_run()

    def muon_lr_scale(self) -> float:
        """Muon's rate over the schedule's (AdamW's): --muon_learning_rate / --learning_rate,
        else --muon_lr_ratio."""
        if self.muon_learning_rate is not None:
            return self.muon_learning_rate / self.learning_rate
        return self.muon_lr_ratio

    def _check_muon(self):
        if self.muon_lr_ratio <= 0:
            raise UsageError(f"--muon_lr_ratio must be > 0 (got {self.muon_lr_ratio})")
        if self.muon_learning_rate is not None:
            if self.muon_learning_rate <= 0 or self.learning_rate <= 0:
                raise UsageError("--muon_learning_rate and --learning_rate must be > 0 (got "
                                 f"{self.muon_learning_rate} and {self.learning_rate})")
            if self.muon_lr_ratio != 1.0:
                raise UsageError("--muon_learning_rate and --muon_lr_ratio both given (keep "
                                 "one: the rate, or its ratio to --learning_rate)")
        if not 0 <= self.muon_momentum < 1:
            raise UsageError(f"--muon_momentum must be in [0, 1) (got {self.muon_momentum})")
        if self.muon_momentum_warmup_steps < 0:
            raise UsageError("--muon_momentum_warmup_steps must be >= 0 (got "
                             f"{self.muon_momentum_warmup_steps})")
        if not 1 <= self.muon_ns_steps < 100:
            raise UsageError(f"--muon_ns_steps must be in 1-99 (got {self.muon_ns_steps})")

    def _check_dry_run(self):
        if not 0 < self.dry_run_mfu <= 1:
            raise UsageError(f"--dry_run_mfu {self.dry_run_mfu} is out of range (use a fraction "
                             "in (0, 1], e.g. 0.4)")
        if self.dry_run_gpu_memory_gb is not None and self.dry_run_gpu_memory_gb <= 0:
            raise UsageError(f"--dry_run_gpu_memory_gb must be > 0 (got "
                             f"{self.dry_run_gpu_memory_gb})")
        if self.dry_run_num_gpus is not None and self.dry_run_num_gpus < 1:
            raise UsageError(f"--dry_run_num_gpus must be >= 1 (got {self.dry_run_num_gpus})")
        if self.dry_run_gpu is not None:
            from .metrics import PEAK_FLOPS

            if self.dry_run_gpu not in PEAK_FLOPS:
                raise UsageError(f"unknown --dry_run_gpu '{self.dry_run_gpu}' (choose one of: "
                                 f"{'; '.join(PEAK_FLOPS)})")


def _one_line_error(message: str, code: int = 2) -> None:
    # one write: under torchrun every rank says it, and print's separate newline write let
    # two ranks' lines run together
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(code)


class _Parser:
    """HfArgumentParser whose argparse errors follow the one-line error contract."""

    def __init__(self, types, description: str | None):
        from transformers import HfArgumentParser

        self.types = list(types)
        self.parser = HfArgumentParser(self.types, description=description)
        self.parser.add_argument("--config", default=None,
                                 help="YAML file of options; command-line options override it.")
        self.parser.error = lambda message: _one_line_error(f"{message} (see --help)")


def parse_config(types, argv=None, description: str | None = None):
    """Parse `argv` into one instance of each dataclass in `types`: YAML first, the CLI over it."""
    p = _Parser(types, description)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        p.parser.set_defaults(**load_yaml(known.config, p.types))
    ns = p.parser.parse_args(argv)
    out = []
    for cls in p.types:
        names = {f.name for f in fields(cls) if f.init}
        out.append(cls(**{k: v for k, v in vars(ns).items() if k in names}))
    return tuple(out)


def load_yaml(path: str, types) -> dict:
    """Read a YAML run config; every key must be an option of one of `types`."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--config {path} does not exist (check the path)")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"--config {path} must be a mapping of option: value")
    known = {f.name for cls in types for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"--config {path} has unknown option(s) {unknown} (see --help)")
    return values


def run_cli(main: Callable, types, argv=None, description: str | None = None):
    """Parse, then run `main(*configs)`; a UsageError anywhere becomes the one-line error
    (exit 2), a TrainingError the one-line error of a failed run (exit 1)."""
    try:
        configs = parse_config(types, argv, description)
        return main(*configs)
    except UsageError as e:
        _one_line_error(str(e))
    except TrainingError as e:  # the session has left the process group (session.run_training)
        _one_line_error(str(e), code=1)
