"""Training throughput of train_clm.py's real loop, beside a minimal hand-written GPT-2 loop.

    python bench/train_throughput.py                                   # tiny preset, demo data, CPU
    python bench/train_throughput.py --preset gpt2 --block_size 1024 --batch_size 16 \
        --mixed_precision bf16 --torch_compile --vocab_size 50257      # a GPU, GPT-2 shapes

Each measurement runs in its own process (so peak memory and compile caches are its own):
(a) `train_clm.main` on the demo stream with the given preset, batch, accumulation, precision,
attention and compile setting, timed from its own per-step metrics after `--warmup` steps;
(b) bench/reference_gpt.py's GPT-2 of the same shapes in nanoGPT's plain loop, on random crops
of a token array. Prints one JSON object: tokens/s, step time, the loop's data-wait fraction,
MFU where the GPU's peak is known, peak memory, and ours / reference.
`--vocab_size` pads the demo tokenizer with unused tokens so the model has GPT-2's vocabulary.

    python bench/train_throughput.py --compare_optimizers             # AdamW against Muon
    python bench/train_throughput.py --compare_optimizers --preset gpt2 --block_size 1024 \
        --batch_size 16 --mixed_precision bf16 --vocab_size 50257     # on a GPU, at 124M

--compare_optimizers instead alternates train_clm.main with --optim adamw_torch and muon
(tokens/s of each, the ratio the median of the pairs'), and times `optimizer.step()` alone on
the preset's model with random gradients (ms a step of each: Muon's Newton-Schulz against
AdamW's fused kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from clm.metrics import read_metrics  # noqa: E402


def peak_memory_gb(device) -> float:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB -> GiB


def padded_tokenizer(name: str, vocab_size: int | None, work: Path) -> str:
    if not vocab_size:
        return name
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name)
    if vocab_size > len(tok):
        tok.add_tokens([f"<|unused{i}|>" for i in range(vocab_size - len(tok))])
    tok.save_pretrained(work / "tokenizer")
    return str(work / "tokenizer")


def ours(args, work: Path) -> dict:
    import torch

    import train_clm
    from clm import attention
    from clm.config import DataConfig, ModelConfig, TrainingConfig, parse_config

    steps = args.warmup + args.steps
    out = Path(args.keep_output).resolve() if args.keep_output else work / "run"
    argv = ["--config", args.config, "--output_dir", str(out), "--overwrite_output_dir",
            "--model_preset", args.preset, "--block_size", str(args.block_size),
            "--tokenizer_name", args.tokenizer, "--max_steps", str(steps),
            "--warmup_steps", "2", "--per_device_train_batch_size", str(args.batch_size),
            "--gradient_accumulation_steps", str(args.grad_accum),
            "--mixed_precision", args.mixed_precision, "--attn_implementation", args.attn,
            "--torch_compile", str(args.torch_compile), "--logging_steps", "1",
            "--eval_steps", "0", "--save_steps", "0", "--num_samples", "0",
            "--validation_split_tokens", str(args.block_size * 4),
            "--dataloader_num_workers", str(args.workers), "--optim", args.optim]
    run = train_clm.main(*parse_config([DataConfig, ModelConfig, TrainingConfig], argv))
    train = read_metrics(out, "train")
    timed = [r for r in train if r["step"] > args.warmup]
    seconds = timed[-1]["elapsed_s"] - train[args.warmup - 1]["elapsed_s"]
    tokens = timed[-1]["tokens"] - train[args.warmup - 1]["tokens"]
    # each record's data_wait is a share of its own window (the steps since the previous
    # record), whose length is its tokens (a running total) less the previous record's over
    # its tokens/s
    previous = [train[args.warmup - 1]] + timed[:-1]
    wait = sum(r["data_wait"] * (r["tokens"] - q["tokens"]) / r["tokens_per_sec"]
               for r, q in zip(timed, previous))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
    return {"tokens_per_sec": round(tokens / seconds, 1),
            "step_s": round(seconds / len(timed), 4), "data_wait": round(wait / seconds, 4),
            "mfu": round(sum(mfus) / len(mfus), 4) if mfus else None,
            "peak_memory_gb": peak_memory_gb(device), "params": run["model_info"]["params"],
            "final_loss": timed[-1]["loss"], "sdpa_backends": attention.attention_kernels()}


def reference(args) -> dict:
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from clm.metrics import peak_flops
    from clm.model import PRESET_SHAPES, padded_vocab
    from reference_gpt import GPT, RandomCrops, plain_train

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = padded_vocab(len(AutoTokenizer.from_pretrained(args.tokenizer)))
    n_layer, n_head, n_embd, n_positions = PRESET_SHAPES[args.preset]
    torch.manual_seed(0)
    model = GPT(vocab, n_layer, n_head, n_embd, n_positions).to(device)
    tokens = np.random.default_rng(0).integers(0, vocab, size=2_000_000)
    crops = RandomCrops(tokens, args.block_size, args.batch_size, seed=0, device=device)
    run = model
    if args.torch_compile:
        run = torch.compile(model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    out = plain_train(run, crops, args.warmup + args.steps, accum=args.grad_accum,
                      lr=6e-4, warmup=2, warmup_steps_excluded=args.warmup, autocast_dtype=dtype)
    n = sum(p.numel() for p in model.parameters())
    non_embedding = n - model.wte.weight.numel() - model.wpe.weight.numel()
    fpt = 6 * non_embedding + 6 * n_embd * vocab + 12 * n_layer * n_embd * args.block_size
    peak = peak_flops(device)
    tps = out["tokens_per_sec"]
    return {"tokens_per_sec": round(tps, 1),
            "step_s": round(out["seconds"] / args.steps, 4), "data_wait": None,
            "mfu": round(fpt * tps / peak, 4) if peak else None,
            "peak_memory_gb": peak_memory_gb(device), "params": n,
            "final_loss": out["losses"][-1]}


def optimizer_steps(args) -> dict:
    """ms per `optimizer.step()` of each optimizer on the preset's model, random gradients,
    the two alternating `--steps` times after `--warmup` steps each."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from clm import optim
    from clm.config import TrainingConfig
    from clm.model import padded_vocab, preset_config

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = padded_vocab(len(AutoTokenizer.from_pretrained(args.tokenizer)))
    model = GPT2LMHeadModel(preset_config(args.preset, vocab)).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {name: optim.make_optimizer(model, TrainingConfig(output_dir="x", optim=name),
                                       fused=True) for name in ("adamw_torch", "muon")}
    times = {name: [] for name in opts}
    for i in range(args.warmup + args.steps):
        for name, opt in opts.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ms = {name: round(1000 * statistics.median(t), 3) for name, t in times.items()}
    return {"step_ms": ms, "muon_over_adamw": round(ms["muon"] / ms["adamw_torch"], 2),
            "params": sum(p.numel() for p in model.parameters()),
            "muon_params": sum(p.numel() for p in optim.roles(model)["hidden_matrices"])}


def median_run(runs: list[dict]) -> dict:
    """The run of median tokens/s, with every run's tokens/s beside it."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_sec"])
    return {**ordered[(len(ordered) - 1) // 2],
            "tokens_per_sec_runs": [r["tokens_per_sec"] for r in runs]}


def child(which: str, args) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-tput-") as work:
        result = ours(args, Path(work)) if which == "ours" else \
            optimizer_steps(args) if which == "steps" else reference(args)
    print("RESULT " + json.dumps(result), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo_cpu.yaml"),
                   help="train_clm.py YAML giving the data and tokenizer")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    p.add_argument("--torch_compile", action="store_true")
    p.add_argument("--workers", type=int, default=1, help="--dataloader_num_workers for ours")
    p.add_argument("--warmup", type=int, default=5, help="steps excluded from the timing")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating runs of each; the ratio is the median of the pairs'")
    p.add_argument("--vocab_size", type=int, default=None,
                   help="pad the tokenizer to this many tokens (50257: GPT-2's vocabulary)")
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["ours", "reference"], default=None)
    p.add_argument("--keep_output", default=None,
                   help="write ours' output folder (the trained model) here and keep it, "
                        "instead of in a temporary folder (bench/gpu_check.sh finetunes and "
                        "samples it)")
    p.add_argument("--optim", default="adamw_torch", help="--optim for ours")
    p.add_argument("--compare_optimizers", action="store_true",
                   help="ours with adamw_torch against ours with muon, and each step alone")
    p.add_argument("--child", choices=["ours", "reference", "steps"], default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args)
    import torch
    import yaml

    with tempfile.TemporaryDirectory(prefix="bench-tput-tok-") as work:
        base = yaml.safe_load(open(args.config)).get("tokenizer_name")
        tok = padded_tokenizer(str(ROOT / base) if not os.path.isabs(base) and
                               (ROOT / base).exists() else base, args.vocab_size, Path(work))
        def measure(which: str, *extra) -> dict:
            cmd = [sys.executable, __file__, *sys.argv[1:], *extra, "--child", which,
                   "--tokenizer", tok]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                sys.exit(f"{which} failed:\n{proc.stderr[-4000:]}")
            return {**json.loads(lines[-1][7:]), "wall_s": round(time.perf_counter() - start, 1)}

        if args.compare_optimizers:
            return compare_optimizers(args, measure)
        runs = {"ours": [], "reference": []}
        # ours and the reference alternate, `--repeats` times: a machine whose speed drifts
        # (other work, thermal limits) then slows both alike, and the ratio is the median of
        # the pairs' ratios
        for _ in range(args.repeats):
            for which in runs:
                if not args.only or which == args.only:
                    runs[which].append(measure(which))
    results = {which: median_run(r) for which, r in runs.items() if r}
    ratio = None
    if runs["ours"] and runs["reference"]:
        ratio = round(statistics.median(o["tokens_per_sec"] / r["tokens_per_sec"]
                                        for o, r in zip(runs["ours"], runs["reference"])), 3)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(json.dumps({"bench": "train_throughput", "device": device, "preset": args.preset,
                      "block_size": args.block_size, "batch_size": args.batch_size,
                      "grad_accum": args.grad_accum, "mixed_precision": args.mixed_precision,
                      "attn": args.attn, "torch_compile": args.torch_compile,
                      "workers": args.workers, "vocab_size": args.vocab_size,
                      "timed_steps": args.steps, "repeats": args.repeats, "warmup_steps": args.warmup, **results,
                      "ours_over_reference": ratio}, indent=1))


def compare_optimizers(args, measure) -> None:
    """train_clm.main with AdamW and with Muon, alternating; then each optimizer's step alone."""
    import torch

    runs = {"adamw_torch": [], "muon": []}
    for _ in range(args.repeats):
        for name in runs:
            runs[name].append(measure("ours", "--optim", name))
    ratio = round(statistics.median(m["tokens_per_sec"] / a["tokens_per_sec"]
                                    for a, m in zip(runs["adamw_torch"], runs["muon"])), 3)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    steps = measure("steps")
    print(json.dumps({"bench": "train_throughput", "compare": "optimizers", "device": device,
                      "preset": args.preset, "block_size": args.block_size,
                      "batch_size": args.batch_size, "mixed_precision": args.mixed_precision,
                      "timed_steps": args.steps, "repeats": args.repeats,
                      **{name: median_run(r) for name, r in runs.items()},
                      "muon_over_adamw_tokens_per_sec": ratio, "optimizer_step": steps},
                     indent=1))


if __name__ == "__main__":
    main()
