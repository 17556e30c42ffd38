"""Accelerator set-up and the true (rank, world size) of this process.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml

On a machine without CUDA, `Accelerator()` under torchrun reports one non-distributed process
and leaves the model unwrapped (no gradient sync); `Accelerator(cpu=True)` gives real gloo DDP,
so that is what we ask for there, unless DeepSpeed or FSDP is configured (cpu=True would
silently replace them with DDP). Ranks are read from torch.distributed, which is the truth when
the two disagree, and a disagreement that would break training is an error.
"""

from __future__ import annotations

import os
import signal

import torch

from .config import TrainingConfig, UsageError

TRACKERS = {"none": [], "wandb": ["wandb"], "tensorboard": ["tensorboard"],
            "all": ["wandb", "tensorboard"]}


def dist_info() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def make_accelerator(cfg: TrainingConfig):
    from accelerate import Accelerator

    plugin_env = any(os.environ.get(k, "false").lower() in ("1", "true")
                     for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"))
    cpu = not torch.cuda.is_available() and not plugin_env
    accelerator = Accelerator(cpu=cpu, mixed_precision=cfg.mixed_precision,
                              log_with=TRACKERS[cfg.report_to] or None,
                              project_dir=cfg.output_dir)
    _, world = dist_info()
    if world != accelerator.num_processes and not plugin_env:
        raise UsageError(f"torch.distributed has {world} processes but Accelerate sees "
                         f"{accelerator.num_processes} (launch with torchrun or accelerate "
                         "launch using a multi-process config)")
    return accelerator


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checks it after each optimizer step on every rank.

    The flag is combined over ranks, so a signal delivered to any one of them stops all of them
    after the same step, and they checkpoint together.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self, device) -> bool:
        flag = self.signal_name is not None
        if dist_info()[1] > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=device)
            torch.distributed.all_reduce(t)
            flag = t.item() > 0
            self.signal_name = self.signal_name or ("a signal to another rank" if flag else None)
        return flag
