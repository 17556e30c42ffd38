"""Accelerator set-up (DDP, DeepSpeed ZeRO or FSDP2) and this process's true (rank, world size).

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_clm.py --config configs/gpt2_124m_owt.yaml

On a machine without CUDA, `Accelerator()` under torchrun reports one non-distributed process
and leaves the model unwrapped (no gradient sync); `Accelerator(cpu=True)` gives real gloo DDP,
so that is what we ask for there, unless DeepSpeed is configured (cpu=True would silently
replace it with DDP); FSDP2 (`--fsdp full_shard` or accelerate_configs/fsdp.yaml) shards the model
itself over that process group. Under DeepSpeed without CUDA, Accelerate picks no backend and
then reports one process of rank 0 on every rank, so the gloo backend is named explicitly.
Ranks are read from torch.distributed, which is the truth when the two disagree, and a
disagreement that would break training is an error.

The DeepSpeed JSON (`--deepspeed FILE`, or the file an accelerate_configs/deepspeed_*.yaml
names) keeps its "auto" values until here, where they are filled from the run's own options,
so batch sizes, clipping and precision are set in one place; a value that contradicts an option
is an error rather than a silent override.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import timedelta

import torch

from .config import TrainingConfig, UsageError

TRACKERS = {"none": [], "wandb": ["wandb"], "tensorboard": ["tensorboard"],
            "all": ["wandb", "tensorboard"]}


def dist_info() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def launch_world_size() -> int:
    """The number of processes the launcher started (before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def close_distributed() -> None:
    """Leave the process group together before the interpreter exits. Left to interpreter
    shutdown, the group's C++ worker threads can be destroyed while still joinable, and the
    process aborts ("terminate called without an active exception", exit -6) after a run that
    finished and wrote everything."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.barrier()
        d.destroy_process_group()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true")


def deepspeed_config_file(cfg: TrainingConfig) -> str | None:
    """`--deepspeed`, else the JSON file `accelerate launch` passed on in the environment."""
    if cfg.deepspeed:
        return cfg.deepspeed
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path or path == "none":
            raise UsageError("Accelerate is configured for DeepSpeed without a JSON file (set "
                             "deepspeed_config_file: ds_configs/zero2.json in the accelerate "
                             "config, or pass --deepspeed)")
        return path
    return None


DS_SIZES = {"reduce_bucket_size": 50_000_000, "stage3_prefetch_bucket_size": 50_000_000}


def deepspeed_config(path: str, cfg: TrainingConfig, world_size: int) -> dict:
    """The DeepSpeed JSON at `path` with its "auto" values filled from `cfg`."""
    try:
        config = json.loads(open(path).read())
    except (OSError, ValueError) as e:
        raise UsageError(f"cannot read DeepSpeed config {path}: {e} (pass a JSON file such as "
                         "ds_configs/zero2.json)") from None
    micro, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    options = {
        "train_micro_batch_size_per_gpu": (micro, "--per_device_train_batch_size"),
        "gradient_accumulation_steps": (accum, "--gradient_accumulation_steps"),
        "train_batch_size": (micro * accum * world_size, "per-device batch x accumulation x "
                             "processes"),
        "gradient_clipping": (cfg.max_grad_norm, "--max_grad_norm"),
    }
    for key, (value, option) in options.items():
        given = config.get(key, "auto")
        if given == "auto":
            config[key] = value
        elif given != value:
            raise UsageError(f"{path} sets {key}={given} but this run has {value} from {option} "
                             f"(write \"auto\" there so that the run's options decide)")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise UsageError(f"{path} has a \"{section}\" section, but the loop sets AdamW and "
                             "the learning-rate schedule from the run's options (remove it)")
    precision = resolve_mixed_precision(cfg.mixed_precision)
    for dtype in ("bf16", "fp16"):
        enabled = config.get(dtype, {}).get("enabled", "auto")
        if enabled is True and precision != dtype:
            raise UsageError(f"{path} enables {dtype} but --mixed_precision is "
                             f"{precision} (write \"auto\" there, or pass "
                             f"--mixed_precision {dtype})")
    zero = config.setdefault("zero_optimization", {})
    stage = zero.get("stage", 0)
    # Left to DeepSpeed, a bf16 run accumulates the micro-batches' gradients in bf16 and
    # reduces them in bf16 (8 bits of mantissa: small updates vanish in the sums). fp32 both:
    # under ZeRO-1 DeepSpeed then picks its BF16_Optimizer (fp32 gradient buffers, one
    # all-reduce per step), under ZeRO-2/3 its ZeRO optimizer with fp32 gradient partitions.
    # Without ZeRO, bf16 with fp32 accumulation is not supported by DeepSpeed 0.19, so stage 0
    # keeps its bf16 accumulation (and reduces in fp32). A value the JSON writes is kept.
    wide = "fp32" if precision == "bf16" else None  # fp16 keeps DeepSpeed's (loss-scaled) fp16
    if config.get("communication_data_type", "auto") == "auto":
        config.pop("communication_data_type", None)
        if wide:
            config["communication_data_type"] = wide
    data_types = config.setdefault("data_types", {})
    if data_types.get("grad_accum_dtype", "auto") == "auto":
        data_types.pop("grad_accum_dtype", None)
        if wide and stage in (1, 2, 3):
            data_types["grad_accum_dtype"] = wide
    # Accelerate fills these "auto"s from the model's width as the HF Trainer does (hidden^2
    # = 589,824 elements for GPT-2 124M: some 200 tiny collectives per micro-batch, and a
    # ZeRO-3 prefetch smaller than one MLP weight). 5e7 elements (200 MB in fp32) is ten
    # times under DeepSpeed's own 5e8 reduce bucket, which in fp32 would allocate 2 GB buffers
    # per bucket; the prefetch is DeepSpeed's default. ZeRO-3's persistence threshold stays
    # Accelerate's 10 x hidden (7,680 for GPT-2 124M: biases and norms kept whole, every
    # matrix sharded), which shards the matrices of a narrow test model too.
    for key, value in DS_SIZES.items():
        if zero.get(key) == "auto":
            zero[key] = value
    if stage == 3:
        if zero.get("stage3_gather_16bit_weights_on_model_save") is False:
            raise UsageError(f"{path} sets stage3_gather_16bit_weights_on_model_save false, but "
                             "every checkpoint holds a loadable model folder (set it to true)")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return config


def deepspeed_device() -> None:
    """Point DeepSpeed at the CPU where there is no CUDA (its own detection looks for CUDA)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _single_process_group_env() -> None:
    """The variables torchrun would set, for a one-process group on a free local port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def configure_cuda_math(cuda: bool) -> None:
    """TF32 matmuls and convolutions on CUDA: fp32 work (optimizer maths, anything outside
    autocast) runs on the tensor cores at ~1e-3 relative precision, as nanoGPT and llm.c do."""
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


PRECISIONS = ("no", "bf16", "fp16")


def resolve_mixed_precision(given: str | None, environ=None) -> str:
    """The precision a run uses: `--mixed_precision` where given, else the launcher's, else no.

    `accelerate launch --mixed_precision X` (or `mixed_precision: X` in its config file) reaches
    the processes as ACCELERATE_MIXED_PRECISION; passing our own value to `Accelerator` would
    silently override it. The launcher always exports the variable, as "no" when nothing was
    chosen, so its "no" is taken as no choice: only a launcher's bf16/fp16 can contradict
    `--mixed_precision`. A DeepSpeed JSON's bf16/fp16 sections are checked against the result
    (deepspeed_config), as before.
    """
    env = os.environ if environ is None else environ
    launcher = (env.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    if given is None:
        if launcher not in PRECISIONS:
            raise UsageError(f"the launcher's mixed precision {launcher} is not supported "
                             "(accelerate launch --mixed_precision bf16, fp16 or no)")
        return launcher
    if launcher != "no" and launcher != given:
        raise UsageError(f"--mixed_precision {given} contradicts the launcher's {launcher} "
                         "(accelerate launch --mixed_precision / the accelerate config): pass "
                         "one of them")
    return given


def make_accelerator(cfg: TrainingConfig):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # resolved in place, so that everything after (run_config.yaml included) sees the precision
    # the run really uses
    cfg.mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
    # FSDP2 is applied by clm/backend.py itself (Accelerate 1.15's FSDP path on CPU silently
    # trains unsynchronised copies, measured): an accelerate config asking for FSDP means
    # --fsdp full_shard, and Accelerate is kept out of it
    fsdp = bool(cfg.fsdp) or _env_flag("ACCELERATE_USE_FSDP")
    os.environ.pop("ACCELERATE_USE_FSDP", None)
    if fsdp and (cfg.deepspeed or _env_flag("ACCELERATE_USE_DEEPSPEED")):
        raise UsageError("--fsdp and DeepSpeed both asked for (choose one: drop --fsdp, or "
                         "--deepspeed / the DeepSpeed accelerate config)")
    cuda = torch.cuda.is_available()
    configure_cuda_math(cuda)
    ds_file = deepspeed_config_file(cfg)
    plugin, group = None, InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))
    if ds_file:  # checked in full before the environment is touched
        from accelerate.utils import DeepSpeedPlugin

        config = deepspeed_config(ds_file, cfg, int(os.environ.get("WORLD_SIZE", "1")))
        deepspeed_device()
        if not cuda:
            group.backend = "gloo"
        if "LOCAL_RANK" not in os.environ:  # plain `python`: DeepSpeed still needs a group
            _single_process_group_env()
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # Accelerate reads it to start DeepSpeed
        plugin = DeepSpeedPlugin(hf_ds_config=config)
    # Accelerate passes on only the values that differ from its own defaults (nccl's 600 s
    # timeout among them), so --ddp_timeout 600 would leave a gloo group at torch's 1800 s:
    # the timeout always goes
    group_kwargs = group.to_kwargs()
    group.to_kwargs = lambda: {**group_kwargs, "timeout": group.timeout}
    accelerator = Accelerator(cpu=not cuda and not plugin,
                              mixed_precision=cfg.mixed_precision, deepspeed_plugin=plugin,
                              kwargs_handlers=[group], log_with=TRACKERS[cfg.report_to] or None,
                              project_dir=cfg.output_dir)
    _, world = dist_info()
    if world != accelerator.num_processes or (world > 1 and
                                               accelerator.distributed_type.value == "NO"):
        raise UsageError(f"torch.distributed has {world} processes but Accelerate sees "
                         f"{accelerator.num_processes} of distributed type "
                         f"{accelerator.distributed_type.value} (launch with torchrun or "
                         "accelerate launch using a multi-process config)")
    from .backend import select

    select(accelerator, fsdp=fsdp, mixed_precision=cfg.mixed_precision)
    return accelerator


def describe(accelerator) -> dict:
    """How this run is distributed, as Accelerate and torch.distributed each see it."""
    info = {"type": accelerator.distributed_type.value,
            "accelerate_num_processes": accelerator.num_processes,
            "torch_world_size": dist_info()[1], "backend": accelerator.state.backend}
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        # read back from the group itself (--ddp_timeout is what was asked for), through
        # torch's private API: a torch without it records null rather than failing the run
        try:
            group = d.distributed_c10d._get_default_group()
            backend = group._get_backend(torch.device(accelerator.device.type))
            info["process_group_timeout_s"] = backend.options._timeout.total_seconds()
        except (AttributeError, RuntimeError):
            info["process_group_timeout_s"] = None
    from .backend import backend_of

    return {**info, **backend_of(accelerator).describe()}


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
