"""Run under `torchrun --nproc_per_node 2`: real gloo ranks read disjoint shards and cycle evenly.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_data_check.py CORPUS TOKENIZER OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist

from clm.config import DataConfig
from clm.data import PackedBlocks, StreamSpec, load_tokenizer, open_source, train_loader


def main(corpus, tokenizer_dir, out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = load_tokenizer(tokenizer_dir)
    cfg = DataConfig(dataset_name=corpus, block_size=32, dataloader_num_workers=1,
                     shuffle_buffer_blocks=16, validation_split_percentage=0)
    source = open_source(cfg)
    spec = StreamSpec(rank=rank, world_size=world, infinite=False, seed=5)
    docs, tokens = [], 0
    for _, t in PackedBlocks(source, tok, 32, 1, spec).documents(0):
        docs.append(int(tok.decode(t[:-1]).split()[0][3:]))
        tokens += len(t)
    # A DDP-like loop: a collective every step. The ranks' data differs in size, yet both
    # cycle into new epochs on their own and finish every step together.
    steps, done = 400, 0
    loader = train_loader(cfg, tok, batch_size=4, seed=5, rank=rank, world_size=world)
    for batch in loader:
        total = batch["input_ids"].sum().float()
        dist.all_reduce(total)
        done += 1
        if done == steps:
            break
    epochs = max(w["start"]["epoch"] for w in loader.state_dict()["workers"] if w["start"])
    gathered = [None] * world
    dist.all_gather_object(gathered, {"docs": docs, "tokens": tokens, "done": done,
                                      "epochs": epochs})
    if rank == 0:
        json.dump({"world_size": world, "dist_world_size": dist.get_world_size(),
                   "docs": [g["docs"] for g in gathered],
                   "epoch_tokens": [g["tokens"] for g in gathered],
                   "epochs": [g["epochs"] for g in gathered],
                   "steps": steps, "steps_done": [g["done"] for g in gathered]},
                  open(out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
