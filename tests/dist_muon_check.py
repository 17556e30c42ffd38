"""Run under `torchrun --nproc_per_node 2`: clm.optim's Muon on an FSDP2-sharded GPT-2 against
the same optimizer on an unsharded copy, fed the same gradients; each rank writes the largest
difference of the gathered weights to OUT/muon_rank<rank>.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_muon_check.py OUT
"""

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from clm import optim  # noqa: E402
from clm.config import TrainingConfig  # noqa: E402


def main(out: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor
    from transformers import GPT2Config, GPT2LMHeadModel

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    # 35 wide: FSDP2 cuts each 35-row Conv1D weight (stored (in, out)) into 18 and 17 rows,
    # and --muon_split_qkv's three matrices run across both shards
    plain = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=5, n_embd=35, n_positions=16,
                                       vocab_size=64))
    sharded = copy.deepcopy(plain)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in sharded.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    cfg = TrainingConfig(output_dir=out, optim="muon", learning_rate=1e-2, muon_split_qkv=True)
    opts = [optim.make_optimizer(m, cfg) for m in (plain, sharded)]
    for step in range(3):
        for opt in opts:
            optim.apply_schedule(opt, step, cfg)
        for p, q in zip(plain.parameters(), sharded.parameters()):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = distribute_tensor(p.grad.clone(), mesh, q.placements)
        for opt in opts:
            opt.step()
    worst = {}
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters()):
        full = q.full_tensor()
        worst[name] = (full - p.detach()).abs().max().item()
    assert all(isinstance(q.placements[0], Shard) for q in sharded.parameters())
    Path(out, f"muon_rank{os.environ['RANK']}.json").write_text(json.dumps(worst))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
