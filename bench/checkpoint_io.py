"""Checkpoint save/load time and size for the gpt2 (124M) preset, and resume cost vs data consumed.

    python bench/checkpoint_io.py --dataset_name data/demo_corpus --tokenizer_name data/demo_tokenizer

Prints JSON: the size of checkpoints/step-N on disk, seconds to save it and to load it back
(model + AdamW state + RNG + data state, through the same functions train_clm.py uses), and for
several amounts of data already consumed, the seconds from loading the data state to the first
batch. The last figure must stay flat: a resume seeks, it does not re-read.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clm import checkpoint as ckpt  # noqa: E402
from clm.config import DataConfig, TrainingConfig  # noqa: E402
from clm.data import load_tokenizer, open_source, train_loader  # noqa: E402
from clm.loop import LoopState  # noqa: E402
from clm.optim import make_optimizer  # noqa: E402


def gpt2_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2 124M exactly (GPT-2's 50257-token vocabulary padded to 50304)
    return GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                                      vocab_size=50304, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def checkpoint_figures(data_cfg, tok, out: Path) -> dict:
    from accelerate import Accelerator

    from clm.parallel import Topology
    from clm.parallel.ddp import DDPBackend

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    backend = DDPBackend(accelerator, Topology())  # one process, as the loop's session has it
    model = gpt2_model()
    optimizer = make_optimizer(model, TrainingConfig(output_dir=str(out)))
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.randint(0, 8192, (1, 64), device=accelerator.device)
    model(input_ids=ids, labels=ids).loss.backward()  # fill AdamW's moments
    optimizer.step()
    loader = train_loader(data_cfg, tok, 1, seed=0)
    next(iter(loader))
    state = LoopState(step=1, tokens=64)
    t0 = time.perf_counter()
    path = ckpt.save_checkpoint(backend, model, optimizer, tok, loader, state,
                                {"fingerprint": {}}, out)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt.load_checkpoint(backend, model, optimizer, path,
                         train_loader(data_cfg, tok, 1, seed=0))
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    return {"params": params, "checkpoint_bytes": dir_size(path),
            "hf_model_bytes": (path / "model.safetensors").stat().st_size,
            "save_s": round(save_s, 2), "load_s": round(load_s, 2)}


def resume_cost(data_cfg, tok, batches_consumed: list[int], batch_size: int) -> list[dict]:
    source = open_source(data_cfg)
    rows = []
    for k in batches_consumed:
        first = train_loader(data_cfg, tok, batch_size, seed=0, source=source)
        for i, _ in enumerate(first):
            if i + 1 == k:
                break
        saved = first.state_dict()
        t0 = time.perf_counter()
        resumed = train_loader(data_cfg, tok, batch_size, seed=0, source=source)
        resumed.load_state_dict(saved)
        next(iter(resumed))
        rows.append({"batches_consumed": k, "tokens_consumed": k * batch_size * data_cfg.block_size,
                     "seconds_to_first_batch": round(time.perf_counter() - t0, 3)})
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset_name", default="data/demo_corpus")
    p.add_argument("--tokenizer_name", default="data/demo_tokenizer")
    p.add_argument("--consumed", type=int, nargs="+", default=[10, 100, 1000])
    args = p.parse_args()
    tok = load_tokenizer(args.tokenizer_name)
    data_cfg = DataConfig(dataset_name=args.dataset_name, block_size=1024,
                          dataloader_num_workers=0)
    out = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        figures = checkpoint_figures(data_cfg, tok, out)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps({"bench": "checkpoint_io", "model": "gpt2 (124M)", **figures,
                      "resume_cost": resume_cost(data_cfg, tok, args.consumed, 8)}, indent=1))


if __name__ == "__main__":
    main()
