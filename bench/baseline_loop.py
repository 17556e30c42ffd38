"""Our training loop against a minimal plain-PyTorch loop: same model, data, tokens, hyperparameters.

    python bench/baseline_loop.py --config configs/demo_cpu.yaml --max_steps 100

Runs train_clm.main (Accelerate, our loop) and then a nanoGPT-style loop written here with no
Accelerate (same initial weights, same batches from the same pipeline, AdamW with the same
groups, the same LR schedule and clipping), and prints both final eval losses and training
tokens/s as JSON with their ratios. Ours must be within 2% on eval loss and at least 90% of the
baseline's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train_clm.py sits at the root
import train_clm  # noqa: E402
from clm.config import DataConfig, ModelConfig, TrainingConfig, parse_config  # noqa: E402
from clm.metrics import read_metrics  # noqa: E402


def baseline(data_cfg: DataConfig, model_cfg: ModelConfig, cfg: TrainingConfig) -> dict:
    """The plain loop. Deliberately self-contained: only data and model building are shared."""
    from clm.data import load_tokenizer, open_source, train_loader, validation_blocks
    from clm.model import build_model

    torch.manual_seed(cfg.seed)  # same seed as set_seed in ours: same initial weights
    import random

    import numpy as np

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    tok = load_tokenizer(data_cfg.tokenizer_name)
    model = build_model(model_cfg, tok, data_cfg.block_size)
    source = open_source(data_cfg)
    batches = iter(train_loader(data_cfg, tok, cfg.per_device_train_batch_size, cfg.seed,
                                source=source))
    heldout = validation_blocks(data_cfg, tok, source)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)

    def get_lr(it):
        if it < cfg.warmup_steps:
            return cfg.learning_rate * (it + 1) / cfg.warmup_steps
        ratio = min(1.0, (it - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)

    model.train()
    tokens, start = 0, time.perf_counter()
    for it in range(cfg.max_steps):
        for g in opt.param_groups:
            g["lr"] = get_lr(it)
        for _ in range(cfg.gradient_accumulation_steps):
            x = next(batches)["input_ids"]
            logits = model(input_ids=x, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
            (loss / cfg.gradient_accumulation_steps).backward()
            tokens += x.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in heldout.split(cfg.per_device_eval_batch_size):
            logits = model(input_ids=chunk, use_cache=False).logits
            nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(),
                                   reduction="sum").item()
            count += chunk[:, 1:].numel()
    return {"eval_loss": nll / count, "tokens": tokens, "train_s": round(elapsed, 2),
            "tokens_per_sec": round(tokens / elapsed, 1)}


def ours(data_cfg, model_cfg, cfg) -> dict:
    result = train_clm.main(data_cfg, model_cfg, cfg)
    last_train = read_metrics(cfg.output_dir, "train")[-1]
    return {"eval_loss": result["final_eval_loss"], "tokens": last_train["tokens"],
            "train_s": last_train["elapsed_s"],
            "tokens_per_sec": round(last_train["tokens"] / last_train["elapsed_s"], 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--max_steps", type=int, default=100)
    args = p.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    argv = ["--config", args.config, "--max_steps", str(args.max_steps), "--eval_steps", "0",
            "--logging_steps", "10", "--num_samples", "0", "--output_dir", str(out / "ours")]
    data_cfg, model_cfg, cfg = parse_config([DataConfig, ModelConfig, TrainingConfig], argv)
    a = ours(data_cfg, model_cfg, cfg)
    b = baseline(data_cfg, model_cfg, cfg)
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({
        "bench": "baseline_loop", "config": args.config, "max_steps": args.max_steps,
        "torch_threads": torch.get_num_threads(), "ours": a, "plain_pytorch": b,
        "eval_loss_rel_diff": round(abs(a["eval_loss"] - b["eval_loss"]) / b["eval_loss"], 5),
        "tokens_per_sec_ratio": round(a["tokens_per_sec"] / b["tokens_per_sec"], 3),
    }, indent=1))


if __name__ == "__main__":
    main()
