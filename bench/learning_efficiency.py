"""Held-out loss per token: train_clm.py's data pipeline against a random-crop reference sampler.

    python bench/learning_efficiency.py                                  # demo corpus, 2 sizes x 3 seeds
    python bench/learning_efficiency.py --sizes tiny --seeds 1 --max_steps 50   # a quick look

Trains the same model with the same loop (train_clm.main), tokens and schedule twice per seed:
(a) on train_clm.py's own stream (streamed, packed, shuffled by --shuffle_buffer_blocks), and
(b) on nanoGPT-style random crops: the training documents (the same ones: the held-out carve is
excluded) flattened into one token array joined by EOS, each sequence cut at a uniformly random
offset. Both are scored on the same held-out blocks. Prints, per size, the mean and spread of
the final held-out loss of each, and the mean number of distinct documents per micro-batch of
our stream with and without the block shuffle. Any train_clm.py option can be passed after `--`
(e.g. `-- --train_files 'my/*.jsonl' --tokenizer_name my_tok`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import train_clm  # noqa: E402
from clm.config import DataConfig, ModelConfig, TrainingConfig, parse_config  # noqa: E402
from reference_gpt import RandomCrops  # noqa: E402

TYPES = [DataConfig, ModelConfig, TrainingConfig]
# name -> (n_layer, n_head, n_embd); block size and vocabulary come from the run's options
SIZES = {"tiny": (4, 4, 128), "4x256": (4, 4, 256), "6x384": (6, 6, 384)}


def training_tokens(data_cfg: DataConfig, tokenizer) -> np.ndarray:
    """Every training document (held-out carve excluded), in stored order, joined by EOS."""
    from clm import data

    source = data.open_source(data_cfg, "train")
    carve = data.heldout_source(data_cfg) == "carve"
    spec = data.StreamSpec(shuffle=False, infinite=False, window=data_cfg.shuffle_window,
                           select="train" if carve else "all",
                           heldout_percentage=data_cfg.validation_split_percentage)
    blocks = data.PackedBlocks(source, tokenizer, data_cfg.block_size, 1, spec,
                               data_cfg.text_column)
    return np.concatenate([tokens for _, tokens in blocks.documents(0)])


def documents_per_batch(data_cfg: DataConfig, tokenizer, batch_size: int, batches: int,
                        seed: int) -> float:
    """Mean distinct documents per micro-batch over the first `batches` of our stream."""
    from clm import data

    loader = data.train_loader(data_cfg, tokenizer, batch_size, seed)
    for i, _ in enumerate(loader, 1):
        if i == batches:
            break
    return loader.documents_seen / loader.batches


def write_model_config(folder: Path, shape, block_size: int) -> str:
    from transformers import GPT2Config

    n_layer, n_head, n_embd = shape
    GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block_size,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               activation_function="gelu_pytorch_tanh").save_pretrained(folder)
    return str(folder)


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4),
            "runs": [round(v, 4) for v in values]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo_cpu.yaml"))
    p.add_argument("--sizes", default="tiny,4x256", help=f"comma list of {sorted(SIZES)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then any train_clm.py options")
    args = p.parse_args()
    rest = [a for a in args.rest if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="bench-learn-"))
    results = {}
    try:
        for size in args.sizes.split(","):
            shape = SIZES[size]
            conf = write_model_config(work / f"config-{size}", shape, args.block_size)
            losses = {"ours": [], "random_crops": []}
            for seed in range(args.seeds):
                argv = ["--config", args.config, "--config_name", conf,
                        "--block_size", str(args.block_size), "--max_steps", str(args.max_steps),
                        "--per_device_train_batch_size", str(args.batch_size),
                        "--gradient_accumulation_steps", "1", "--eval_steps", "0",
                        "--save_steps", "0", "--num_samples", "0", "--logging_steps", "50",
                        "--seed", str(1000 + seed), "--overwrite_output_dir", *rest]
                for kind in losses:
                    out = work / f"{size}-{seed}-{kind}"
                    cfgs = parse_config(TYPES, argv + ["--output_dir", str(out)])
                    batches = None
                    if kind == "random_crops":
                        from clm.data import load_tokenizer

                        data_cfg, _, train_cfg = cfgs
                        tok = load_tokenizer(data_cfg.tokenizer_name)
                        batches = RandomCrops(training_tokens(data_cfg, tok), args.block_size,
                                              train_cfg.per_device_train_batch_size,
                                              train_cfg.seed)
                    run = train_clm.main(*cfgs, batches=batches)
                    losses[kind].append(run["final_eval_loss"])
                    print(f"# {size} seed {seed} {kind}: held-out loss "
                          f"{run['final_eval_loss']:.4f}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            results[size] = {k: spread(v) for k, v in losses.items()}
            results[size]["ours_minus_reference"] = round(
                results[size]["ours"]["mean"] - results[size]["random_crops"]["mean"], 4)
        data_cfg, _, train_cfg = parse_config(TYPES, ["--config", args.config, "--block_size",
                                                      str(args.block_size), "--output_dir",
                                                      str(work / "docs"), *rest])
        from clm.data import load_tokenizer

        tok = load_tokenizer(data_cfg.tokenizer_name)
        docs = {}
        for blocks in (1, data_cfg.shuffle_buffer_blocks):
            data_cfg.shuffle_buffer_blocks = blocks
            docs[f"shuffle_buffer_blocks={blocks}"] = round(documents_per_batch(
                data_cfg, tok, args.batch_size, args.max_steps, train_cfg.seed), 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "learning_efficiency", "config": args.config,
                      "tokens_per_run": args.max_steps * args.batch_size * args.block_size,
                      "steps": args.max_steps, "batch_size": args.batch_size,
                      "block_size": args.block_size, "extra_options": rest,
                      "held_out_loss": results,
                      "distinct_documents_per_micro_batch": docs}, indent=1))
    print(f"\n{'size':8} {'ours (mean ± std)':>22} {'random crops (mean ± std)':>28}  diff")
    for size, r in results.items():
        o, c = r["ours"], r["random_crops"]
        print(f"{size:8} {o['mean']:>13.4f} ± {o['std']:.4f} {c['mean']:>19.4f} ± {c['std']:.4f}"
              f"  {r['ours_minus_reference']:+.4f}")


if __name__ == "__main__":
    main()
