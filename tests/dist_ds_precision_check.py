"""Run under torchrun (2 processes): what DeepSpeed really does with ds_configs/<name>.json under
bf16, for each config named, as the training session builds the engine.

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_ds_precision_check.py OUT zero1,zero2,zero3

For each: the engine through runtime.start and the backend's prepare (so Accelerate fills
what it fills), one optimizer step of two micro-batches, and what rank 0 saw written to
OUT/<name>.json: the optimizer class DeepSpeed picked, its communication and gradient
accumulation dtypes, the dtype of the gradient buffers it accumulated into, its reduce bucket
(and ZeRO-3's prefetch bucket, persistence threshold and the parameters it keeps whole), and the dtypes of the floating-point
tensors handed to torch.distributed's reducing collectives during the step.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clm import loop, optim, runtime  # noqa: E402
from clm.parallel.launch import Topology, close_distributed  # noqa: E402
from clm.config import TrainingConfig  # noqa: E402
from dist_reshard_check import batch, dist_info, reset_accelerate, tiny_model  # noqa: E402

REDUCING = ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "reduce",
            "all_reduce_coalesced")


def record_reductions(seen: set) -> list:
    """Wrap torch.distributed's reducing collectives (and the one DeepSpeed's communication
    backend captured at start-up) to note the dtypes they are given; returns what to restore."""
    from deepspeed.comm import comm

    targets = [(dist, name) for name in REDUCING if hasattr(dist, name)]
    targets.append((comm.cdb, "reduce_scatter_function"))
    originals = []
    for owner, name in targets:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def wrapped(*args, _original=original, **kwargs):
            for value in list(args) + list(kwargs.values()):
                for t in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        seen.add(str(t.dtype).removeprefix("torch."))
            return _original(*args, **kwargs)

        setattr(owner, name, wrapped)
    return originals


def check(name: str, out: Path) -> dict:
    reset_accelerate()
    rank, world = dist_info()
    cfg = TrainingConfig(output_dir=str(out / name),
                         deepspeed=str(ROOT / "ds_configs" / f"{name}.json"),
                         per_device_train_batch_size=4 // world, gradient_accumulation_steps=2,
                         max_grad_norm=1.0, mixed_precision="bf16", report_to="none")
    backend = runtime.start(cfg, Topology.from_launcher())
    model = tiny_model(0)
    make = lambda m: optim.make_optimizer(m, cfg, fused=False)  # noqa: E731
    engine, _ = backend.prepare(model, make(model), make)
    opt = engine.optimizer
    seen: set = set()
    originals = record_reductions(seen)
    try:
        sums = loop.forward_backward(engine, [batch(1, rank, world), batch(2, rank, world)],
                                     backend)
        result = backend.clip_and_step(engine, opt, cfg.max_grad_norm, False, sums)
    finally:
        for owner, key, fn in originals:
            setattr(owner, key, fn)
    # the gradient buffers the optimizer accumulated the micro-batches into
    if hasattr(opt, "fp32_groups_gradients_flat"):  # BF16_Optimizer
        accum, buffers = opt.grad_acc_dtype, opt.fp32_groups_gradients_flat
    else:  # ZeRO-1/2 (DeepSpeedZeroOptimizer), ZeRO-3
        accum, buffers = opt.gradient_accumulation_dtype, []
        if hasattr(opt, "grad_partitions_flat_buffer"):
            buffers = [opt.grad_partitions_flat_buffer]
        elif getattr(opt, "grads_in_partition", None) is not None:
            buffers = [opt.grads_in_partition]
    info = {"optimizer": type(opt).__name__,
            "communication_data_type": str(engine.communication_data_type),
            "grad_accum_dtype": str(accum),
            "grad_buffer_dtypes": sorted({str(b.dtype) for b in buffers}),
            "reduced_dtypes": sorted(seen),
            "reduce_bucket_size": getattr(opt, "reduce_bucket_size", None),
            "engine_reduce_bucket_size": engine.zero_reduce_bucket_size(),
            "prefetch_bucket_size": engine.zero_prefetch_bucket_size(),
            "param_persistence_threshold": engine.zero_param_persistence_threshold(),
            # ZeRO-3: the parameters kept whole on every rank rather than sharded
            "persistent": sorted(n for n, p in engine.module.named_parameters()
                                 if getattr(p, "ds_persist", False)),
            "params": sorted(n for n, _ in engine.module.named_parameters()),
            "stepped": result.stepped, "loss": result.nll / max(result.labels, 1),
            "grad_norm": result.grad_norm}
    if rank == 0:
        (out / f"{name}.json").write_text(json.dumps(info, indent=1))
    dist.barrier()
    return info


def main():
    out = Path(sys.argv[1])
    for name in sys.argv[2].split(","):
        check(name, out)
    close_distributed()


if __name__ == "__main__":
    main()
