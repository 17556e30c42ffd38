"""Sampling from any model folder this project writes (final or checkpoint) or any Hub causal LM.

    python generate.py --model outputs/demo --prompt "The model" --prompt "A function" --max_new_tokens 40

LoRA runs load too: a checkpoint or a `--merge_adapters false` folder holds peft adapters, which
are merged into the base model they name (clm.export.load_plain_model, shared with export).

Prompts are batched with left padding and an attention mask, so a batch gives the same greedy
text as each prompt alone. The model's generation_config (EOS/pad, suppressed padding ids)
applies; the options here override it. Same seed, same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import UsageError, _help


@dataclass
class SamplingConfig:
    """What to sample and how."""

    model: Optional[str] = _help("Model folder (final, checkpoints/step-N or LoRA adapters) or "
                                 "Hub name.", default=None)
    prompt: Optional[list[str]] = field(default=None, metadata={
        "help": "Prompt(s) to complete; repeat --prompt for a batch.", "action": "extend"})
    max_new_tokens: int = _help("Tokens to generate per completion.", default=64)
    do_sample: bool = _help("Sample (true) or decode greedily (false).", default=True)
    temperature: float = _help("Softmax temperature (> 0).", default=0.8)
    top_k: int = _help("Sample among the k most likely tokens (0: no limit).", default=50)
    top_p: float = _help("Nucleus sampling mass in (0, 1].", default=1.0)
    repetition_penalty: float = _help("Penalty > 1 discourages repeats (1: none).", default=1.0)
    num_return_sequences: int = _help("Completions per prompt.", default=1)
    seed: int = _help("Seed: the same seed gives the same text.", default=1337)
    stream: bool = _help("Print tokens as they are generated (prompts one at a time).",
                         default=False)
    device: str = _help("auto (CUDA if available), cpu or cuda.", default="auto")
    dtype: str = _help("auto (bf16 on CUDA where supported, else fp32), float32, bfloat16 or "
                       "float16.", default="auto")

    def __post_init__(self):
        if not self.model:
            raise UsageError("--model is required (a folder written by train_clm.py, a "
                             "checkpoint folder, or a Hub name)")
        if not self.prompt:
            raise UsageError("--prompt is required (repeat it for several prompts)")
        checks = [(self.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
                  (self.temperature > 0, "--temperature must be > 0"),
                  (self.top_k >= 0, "--top_k must be >= 0 (0 disables it)"),
                  (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "--repetition_penalty must be > 0"),
                  (self.num_return_sequences >= 1, "--num_return_sequences must be >= 1"),
                  (self.do_sample or self.num_return_sequences == 1,
                   "--num_return_sequences > 1 needs sampling (drop --do_sample false)"),
                  (self.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda"),
                  (self.dtype in ("auto", "float32", "bfloat16", "float16"),
                   "--dtype must be auto, float32, bfloat16 or float16")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda but no CUDA device is available (use --device cpu)")


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) ready for generation: a model folder, a LoRA checkpoint or adapter
    folder (merged into its base), or a Hub name; a folder without a model is a UsageError."""
    from .export import load_plain_model

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dt = getattr(torch, dtype)
    model, tokenizer = load_plain_model(name, dt, arg="--model ")
    model = model.to(dev)
    tokenizer.padding_side = "left"  # completions start right after every prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def generation_kwargs(cfg: SamplingConfig, tokenizer) -> dict:
    kwargs = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
              "num_return_sequences": cfg.num_return_sequences,
              "repetition_penalty": cfg.repetition_penalty,
              "pad_token_id": tokenizer.pad_token_id}
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    else:  # greedy: no sampling knobs (transformers warns about unused ones)
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], cfg: SamplingConfig, streamer=None) -> list[str]:
    """Prompt + completion for each prompt (num_return_sequences each, grouped by prompt)."""
    torch.manual_seed(cfg.seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**enc, **generation_kwargs(cfg, tokenizer), streamer=streamer)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    prompts_rep = [p for p in prompts for _ in range(cfg.num_return_sequences)]
    return [p + t for p, t in zip(prompts_rep, texts)]
