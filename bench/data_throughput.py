"""Tokens/s of the data pipeline alone (stream + tokenize + pack + batch), by DataLoader workers.

    python bench/data_throughput.py --dataset_name data/demo_corpus --tokenizer_name data/demo_tokenizer

Prints one JSON object: for each worker count, steady-state tokens/s (after the first batches,
which include start-up), seconds to the first batch, and the machine it ran on. The training
loop consumes these batches at the GPU's speed (GPT-2 124M on one H100: about 500k tokens/s),
so this figure must stay above that per GPU's share of CPU cores.
"""

import argparse
import json
import os
import platform
import time

import torch

from clm.config import DataConfig
from clm.data import load_tokenizer, open_source, train_loader


def measure(cfg: DataConfig, tokenizer, source, batch_size: int, tokens: int, warmup: int = 3):
    loader = train_loader(cfg, tokenizer, batch_size, seed=0, source=source)
    start = time.perf_counter()
    seen, first, t0, n0 = 0, None, None, 0
    for i, batch in enumerate(loader):
        seen += batch["input_ids"].numel()
        if first is None:
            first = time.perf_counter() - start
        if i == warmup:
            t0, n0 = time.perf_counter(), seen
        if seen - n0 >= tokens and t0 is not None:
            break
    return {"tokens_per_sec": round((seen - n0) / (time.perf_counter() - t0)),
            "first_batch_s": round(first, 3), "tokens": seen - n0}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_name", default="data/demo_corpus")
    p.add_argument("--tokenizer_name", default="data/demo_tokenizer")
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=2_000_000, help="tokens timed per setting")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args()
    tok = load_tokenizer(args.tokenizer_name)
    results = {}
    for workers in args.workers:
        cfg = DataConfig(dataset_name=args.dataset_name, block_size=args.block_size,
                         dataloader_num_workers=workers)
        results[str(workers)] = measure(cfg, tok, open_source(cfg), args.batch_size, args.tokens)
    print(json.dumps({"bench": "data_throughput", "dataset": args.dataset_name,
                      "vocab_size": len(tok), "block_size": args.block_size,
                      "batch_size": args.batch_size, "cpu_cores": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                      "workers": results}, indent=1))


if __name__ == "__main__":
    main()
