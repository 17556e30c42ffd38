"""Run under `torchrun --nproc_per_node 2`: FSDP2 under fp16 scales the loss, skips a step whose
gradients overflowed on any one rank (every rank alike), survives a non-finite loss, and trains
on after both. Writes OUT/fp16_<rank>.json for tests/test_precision.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_fsdp_fp16_check.py OUT
"""

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from clm import loop, optim, runtime  # noqa: E402
from clm.parallel.launch import Topology, close_distributed  # noqa: E402
from clm.config import TrainingConfig  # noqa: E402
from dist_reshard_check import batch, dist_info, tiny_model  # noqa: E402


def main(out: Path):
    cfg = TrainingConfig(output_dir=str(out), fsdp="full_shard", mixed_precision="fp16",
                         per_device_train_batch_size=2, max_grad_norm=1.0, report_to="none")
    backend = runtime.start(cfg, Topology.from_launcher())
    rank, world = dist_info()
    make = lambda m: optim.make_optimizer(m, cfg, fused=backend.fused_optimizer())  # noqa: E731
    model, optimizer = backend.prepare(tiny_model(0), make(tiny_model(0)), make)
    sharded = [p for group in optimizer.param_groups for p in group["params"]]
    shard = lambda: torch.cat([p.to_local().detach().flatten() for p in sharded])  # noqa: E731
    steps = []
    for step, fault in enumerate(["none", "overflow on rank 1", "non-finite loss", "none"]):
        before = shard()
        sums = loop.forward_backward(model, [batch(step + 1, rank, world)], backend)
        if fault == "overflow on rank 1" and rank == 1:
            sharded[0].grad.to_local()[0] = float("inf")
        if fault == "non-finite loss":
            sums[0] = float("nan")
        result = loop._optimizer_step(backend, model, optimizer, cfg, sums)
        after = shard()
        steps.append({"fault": fault, "stepped": result.stepped,
                      "moved": not torch.equal(before, after),
                      "finite_weights": bool(torch.isfinite(after).all()),
                      "scale": backend.scaler.get_scale()})
    ids = batch(1, rank, world)["input_ids"]
    steps.append({"logits_dtype": str(model(input_ids=ids).logits.dtype)})
    out.mkdir(parents=True, exist_ok=True)
    (out / f"fp16_{rank}.json").write_text(json.dumps(steps))
    close_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
