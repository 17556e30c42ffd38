"""The accelerator a run needs and its backend (`start`), the trackers, and stop requests.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_clm.py --config configs/gpt2_124m_owt.yaml

On a machine without CUDA, `Accelerator()` under torchrun reports one non-distributed process
and leaves the model unwrapped (no gradient sync); `Accelerator(cpu=True)` gives real gloo DDP,
so that is what we ask for there, unless DeepSpeed is configured (cpu=True would silently
replace it with DDP); FSDP2 (`--fsdp full_shard` or accelerate_configs/fsdp.yaml) shards the model
itself over that process group. Under DeepSpeed without CUDA, Accelerate picks no backend and
then reports one process of rank 0 on every rank, so the gloo backend is named explicitly.
The launcher's ranks (clm.parallel.launch.Topology) are held against torch.distributed's and
Accelerate's, and a disagreement that would break training is an error.
"""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import torch

from . import parallel
from .config import TrainingConfig
from .errors import UsageError
from .parallel import Backend, Topology
from .parallel.deepspeed import deepspeed_device, single_process_group_env
from .parallel.launch import resolve_mixed_precision, shared_store_warning

TRACKERS = {"none": [], "wandb": ["wandb"], "tensorboard": ["tensorboard"],
            "all": ["wandb", "tensorboard"]}


def configure_cuda_math(cuda: bool) -> None:
    """TF32 matmuls and convolutions on CUDA: fp32 work (optimizer maths, anything outside
    autocast) runs on the tensor cores at ~1e-3 relative precision, as nanoGPT and llm.c do."""
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def start(cfg: TrainingConfig, topology: Topology) -> Backend:
    """The accelerator for the backend `parallel.choose` picks, and that backend over it; the
    one place either is made. `topology` is the launcher's (Topology.from_launcher), checked
    here against the process group the accelerator joined."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # resolved in place, so that everything after (run_config.yaml included) sees the precision
    # the run really uses
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    choice = parallel.choose(cfg, topology.world_size)
    # FSDP2 is applied by clm/parallel/fsdp.py itself (Accelerate 1.15's FSDP path on CPU
    # silently trains unsynchronised copies, measured): Accelerate is kept out of it
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    cuda = torch.cuda.is_available()
    configure_cuda_math(cuda)
    plugin, group = None, InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))
    if choice.name == "deepspeed":
        from accelerate.utils import DeepSpeedPlugin

        deepspeed_device()
        if not cuda:
            group.backend = "gloo"
        if "LOCAL_RANK" not in os.environ:  # plain `python`: DeepSpeed still needs a group
            single_process_group_env()
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # Accelerate reads it to start DeepSpeed
        plugin = DeepSpeedPlugin(hf_ds_config=choice.deepspeed_config)
    # Accelerate passes on only the values that differ from its own defaults (nccl's 600 s
    # timeout among them), so --ddp_timeout 600 would leave a gloo group at torch's 1800 s:
    # the timeout always goes
    parallel.join_restarted_group(topology, group.timeout, "nccl" if cuda else "gloo")
    warning = shared_store_warning(topology)
    if warning and topology.is_main:
        print(warning)
    group_kwargs = group.to_kwargs()
    group.to_kwargs = lambda: {**group_kwargs, "timeout": group.timeout}
    accelerator = Accelerator(cpu=not cuda and not plugin,
                              mixed_precision=cfg.mixed_precision, deepspeed_plugin=plugin,
                              kwargs_handlers=[group], log_with=TRACKERS[cfg.report_to] or None,
                              project_dir=cfg.output_dir)
    topology.check_group()
    if topology.world_size != accelerator.num_processes or (
            topology.distributed and accelerator.distributed_type.value == "NO"):
        raise UsageError(f"torch.distributed has {topology.world_size} processes but "
                         f"Accelerate sees {accelerator.num_processes} of distributed type "
                         f"{accelerator.distributed_type.value} (launch with torchrun or "
                         "accelerate launch using a multi-process config)")
    return parallel.make_backend(choice, accelerator, topology, cfg.mixed_precision)


def describe(backend: Backend) -> dict:
    """How this run is distributed, as Accelerate and torch.distributed each see it."""
    accelerator = backend.accelerator
    info = {"type": accelerator.distributed_type.value,
            "accelerate_num_processes": accelerator.num_processes,
            "torch_world_size": backend.topology.world_size,
            "nodes": backend.topology.num_nodes,
            "backend": accelerator.state.backend, "parallel": backend.name}
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        # read back from the group itself (--ddp_timeout is what was asked for), through
        # torch's private API: a torch without it records null rather than failing the run
        try:
            group = d.distributed_c10d._get_default_group()
            pg = group._get_backend(torch.device(accelerator.device.type))
            info["process_group_timeout_s"] = pg.options._timeout.total_seconds()
        except (AttributeError, RuntimeError):
            info["process_group_timeout_s"] = None
    return {**info, **backend.describe()}


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop acts on it after an optimizer step, on every rank.

    The flag travels with the step's token counts (loop.forward_backward sums `local()` over
    the ranks, read in the step's one host sync), so a signal delivered to any one rank stops
    all of them after the same step, and they checkpoint together; no extra collective or
    sync per step.
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

    def local(self) -> bool:
        """Whether this rank was asked to stop."""
        return self.signal_name is not None

    def observe(self, any_rank: bool) -> bool:
        """Whether to stop now, given whether any rank asked during the step."""
        if any_rank and self.signal_name is None:
            self.signal_name = "a signal to another rank"
        return bool(any_rank)
