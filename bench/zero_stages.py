"""DDP against DeepSpeed ZeRO-1/2/3 and ZeRO-3 offload: the same run, tokens/s, memory, checkpoint.

    python bench/zero_stages.py                                              # CPU: tiny, 2 processes
    python bench/zero_stages.py --nproc 1 --model_preset gpt2 --block_size 1024 \
        --batch 8 --max_steps 40 --mixed_precision bf16 --modes ddp zero1 zero2 zero3 zero3_offload

Each mode is a real `torchrun` launch of train_clm.py on the demo corpus (`make tokenizer`
builds it) with the same seed, batches and steps; only the distribution changes. Prints one JSON
line a mode: final train loss, median tokens/s over the steps after the first quarter, rank 0's
peak CUDA memory (null on CPU), the size of the last checkpoint's training state, and the wall
time of the launch. The losses must agree across modes (the ZeRO stages change where state
lives, not the arithmetic), to about 1e-5 in fp32 and a few 1e-3 in bf16.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from clm.metrics import read_metrics  # noqa: E402

MODES = ["ddp", "zero1", "zero2", "zero3", "zero3_offload"]


def launch(mode: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(args.nproc), str(ROOT / "train_clm.py"), "--output_dir", str(out),
           "--dataset_name", args.dataset_name, "--tokenizer_name", args.tokenizer_name,
           "--model_preset", args.model_preset, "--block_size", str(args.block_size),
           "--per_device_train_batch_size", str(args.batch),
           "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
           "--max_steps", str(args.max_steps), "--logging_steps", "1", "--eval_steps", "0",
           "--save_steps", str(args.max_steps), "--num_samples", "0", "--warmup_steps", "5",
           "--mixed_precision", args.mixed_precision, "--validation_split_tokens", "0",
           "--validation_split_percentage", "0", "--seed", "0"]
    if mode != "ddp":
        cmd += ["--deepspeed", str(ROOT / "ds_configs" / f"{mode}.json")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"mode": mode, "error": proc.stderr.strip().splitlines()[-1:]}
    train = read_metrics(out, "train")
    steady = train[len(train) // 4:] or train
    state = out / "checkpoints" / f"step-{args.max_steps}" / "state"
    memory = [r["max_memory_gb"] for r in train if r.get("max_memory_gb") is not None]
    return {"mode": mode, "final_loss": train[-1]["loss"],
            "tokens_per_sec": round(statistics.median(r["tokens_per_sec"] for r in steady), 1),
            "max_memory_gb_rank0": max(memory) if memory else None,
            "state_mb": round(sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
                              / 2**20, 1),
            "wall_s": round(wall, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", nargs="+", choices=MODES, default=MODES[:4])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model_preset", default="tiny")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--gradient_accumulation_steps", type=int, default=2)
    p.add_argument("--max_steps", type=int, default=20)
    p.add_argument("--mixed_precision", default="no")
    p.add_argument("--dataset_name", default=str(ROOT / "data" / "demo_corpus"))
    p.add_argument("--tokenizer_name", default=str(ROOT / "data" / "demo_tokenizer"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="zero-bench-") as tmp:
        results = [launch(mode, Path(tmp) / mode, args) for mode in args.modes]
        for r in results:
            print(json.dumps(r))
    losses = [r["final_loss"] for r in results if "final_loss" in r]
    if len(losses) > 1:
        spread = max(losses) - min(losses)
        print(json.dumps({"final_loss_spread": spread}))


if __name__ == "__main__":
    main()
