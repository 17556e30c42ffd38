"""Under `torchrun --nproc_per_node N`: each rank builds the held-out set of each case of CASES.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_heldout_check.py TOKENIZER CASES.json OUT.json

CASES.json is a list of DataConfig keyword arguments. OUT.json gets, per case, each rank's
sha256 of the held-out tensor and the shards that rank opened.
"""

import hashlib
import json
import sys

import torch
import torch.distributed as dist

from clm import data
from clm.config import DataConfig


def main(tokenizer_dir, cases_file, out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = data.load_tokenizer(tokenizer_dir)
    opened = []
    open_item = data.PackedBlocks._open_item

    def counting(self, item, taken):
        opened.append(item[0])
        return open_item(self, item, taken)

    data.PackedBlocks._open_item = counting
    results = []
    for case in json.load(open(cases_file)):
        opened.clear()
        val = data.validation_blocks(DataConfig(**case), tok, None, rank, world)
        results.append({"sha256": hashlib.sha256(val.numpy().tobytes()).hexdigest(),
                        "shape": list(val.shape), "opened": sorted(opened)})
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        json.dump([[g[i] for g in gathered] for i in range(len(results))], open(out, "w"))
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(*sys.argv[1:4])
