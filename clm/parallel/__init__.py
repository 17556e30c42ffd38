"""Distributed backends behind one interface: DDP (and a single process), DeepSpeed ZeRO, FSDP2.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --fsdp full_shard --output_dir outputs/fsdp
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_clm.py --config configs/gpt2_124m_owt.yaml

`choose` decides the backend once, from the run's options and the launcher's (an accelerate
config asking for DeepSpeed or FSDP); the run (`runtime.start`) and the `--dry_run` planner both
take that one choice. `runtime.start` makes the accelerator the choice needs and then the
`Backend` (`make_backend`), which is handed to the loop, the checkpoints and the evaluations;
none of them asks which backend it is. A checkpoint's manifest records the backend's name, and
export reads the weights back through `BACKENDS[name].weights_from_state`.

    launch.py     Topology (this process's ranks) and the launcher's precision: the one reader
                  of the environment and of torch.distributed's ranks
    base.py       the Backend interface, StepResult, what the backends share
    ddp.py        DDP through Accelerate, and a single process
    deepspeed.py  DeepSpeed ZeRO-1/2/3: the JSON's "auto"s filled, universal checkpoints
    fsdp.py       FSDP2 fully_shard, torch.distributed.checkpoint states
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import TrainingConfig
from ..errors import UsageError
from .base import Backend
from .ddp import DDPBackend
from .deepspeed import DeepSpeedBackend, deepspeed_config, deepspeed_config_file
from .fsdp import FSDPBackend
from .launch import Topology, env_flag, join_restarted_group, resolve_mixed_precision

BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (DDPBackend, DeepSpeedBackend,
                                                          FSDPBackend)}


@dataclass(frozen=True)
class Choice:
    """The backend a run uses, and for DeepSpeed its JSON with the "auto"s filled."""

    name: str                               # a key of BACKENDS
    deepspeed_file: str | None = None
    deepspeed_config: dict | None = None


def choose(cfg: TrainingConfig, world_size: int) -> Choice:
    """`--deepspeed` (or accelerate's DeepSpeed config), `--fsdp` (or accelerate's FSDP
    config), else DDP; for `world_size` processes (the launcher's, or the planner's GPUs).
    Everything is checked here, before the environment is touched."""
    fsdp = bool(cfg.fsdp) or env_flag("ACCELERATE_USE_FSDP")
    if fsdp and (cfg.deepspeed or env_flag("ACCELERATE_USE_DEEPSPEED")):
        raise UsageError("--fsdp and DeepSpeed both asked for (choose one: drop --fsdp, or "
                         "--deepspeed / the DeepSpeed accelerate config)")
    ds_file = deepspeed_config_file(cfg)
    if fsdp and cfg.optim == "adamw_torch_fused" and \
            resolve_mixed_precision(cfg.mixed_precision) == "fp16":
        raise UsageError("--optim adamw_torch_fused cannot run under FSDP with fp16 (torch's "
                         "fused AdamW rejects the sharded loss scaler's flag): use --optim "
                         "adamw_torch, or --mixed_precision bf16")
    if ds_file:
        config = deepspeed_config(ds_file, cfg, world_size)
        if cfg.optim == "muon":
            _check_muon_zero(config, ds_file)
        return Choice("deepspeed", ds_file, config)
    return Choice("fsdp" if fsdp else "ddp")


def _check_muon_zero(config: dict, ds_file: str) -> None:
    """--optim muon under DeepSpeed: ZeRO-1/2 with the optimizer on the GPU, where each rank's
    flat partition is read back into whole matrices (optim.FlatLayout)."""
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (1, 2):
        raise UsageError(f"--optim muon runs under DeepSpeed ZeRO-1/2 only ({ds_file} has stage "
                         f"{stage}): use ds_configs/zero2.json, or --fsdp full_shard to shard "
                         "the parameters too")
    if (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None):
        raise UsageError(f"--optim muon cannot step on the host ({ds_file} offloads the "
                         "optimizer): drop zero_optimization.offload_optimizer, or use "
                         "--fsdp full_shard")


def make_backend(choice: Choice, accelerator, topology: Topology,
                 mixed_precision: str = "no") -> Backend:
    """The run's backend over the accelerator `runtime.start` made for `choice`."""
    if choice.name == "fsdp":
        return FSDPBackend(accelerator, topology, mixed_precision)
    return BACKENDS[choice.name](accelerator, topology)


__all__ = ["BACKENDS", "Backend", "Choice", "Topology", "choose", "make_backend"]
