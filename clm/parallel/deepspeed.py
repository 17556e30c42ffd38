"""DeepSpeed ZeRO-1/2/3 through Accelerate's DeepSpeed plugin: the engine owns clipping, stepping
and the accumulation boundary (set by us, with the already token-normalised loss); the HF
folders get the optimizer's fp32 masters.

    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml train_clm.py --config configs/gpt2_124m_owt.yaml
    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --deepspeed ds_configs/zero2.json --output_dir outputs/zero2

The DeepSpeed JSON (`--deepspeed FILE`, or the file an accelerate_configs/deepspeed_*.yaml
names) keeps its "auto" values until `deepspeed_config`, where they are filled from the run's
own options, so batch sizes, clipping and precision are set in one place; a value that
contradicts an option is an error rather than a silent override.

A training state loads on a different number of processes than it was saved on: ZeRO's
partitions are converted once into a universal checkpoint (`state/universal/`, DeepSpeed's
`ds_to_universal`) that every rank reads its new partition from.

--optim muon (ZeRO-1/2): the optimizer is still ours (optim.MuonWithAdamW), told after
`prepare` where each matrix lies in the flat partitions DeepSpeed hands it (`flat_layouts`),
so clipping, the schedule and Muon's update are the DDP run's.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..config import TrainingConfig
from ..errors import UsageError, first_line
from ..optim import FlatLayout, MuonWithAdamW
from .base import StepResult, plain_copy, reseed_new_rank
from .ddp import DDPBackend
from .launch import Topology, env_flag, resolve_mixed_precision

UNIVERSAL_DIR = "universal"  # DeepSpeed's universal checkpoint of a state/, made on demand
MUON_STATE = "momentum_buffer"  # MuonWithAdamW's (and torch.optim.Muon's) state of a matrix
ZERO_TAG = "pytorch_model"  # the tag Accelerate's save_state gives DeepSpeed checkpoints


class DeepSpeedBackend(DDPBackend):
    """DeepSpeed ZeRO-1/2/3 through Accelerate's DeepSpeed plugin."""

    name = "deepspeed"

    def __init__(self, accelerator, topology):
        super().__init__(accelerator, topology)
        self.config = accelerator.state.deepspeed_plugin.deepspeed_config
        self.stage = int(self.config.get("zero_optimization", {}).get("stage", 0))
        self.shards_parameters = self.stage == 3

    def fused_optimizer(self) -> bool:
        # Only with the optimizer states on the GPU: ZeRO-Offload steps them on the host with
        # its own optimizer, and DeepSpeed on CPU is a test set-up.
        if self.accelerator.device.type != "cuda":
            return False
        offload = self.config.get("zero_optimization", {}).get("offload_optimizer", {})
        return offload.get("device", "none") in ("none", None)

    def prepare(self, model, optimizer, make_optimizer=None):
        model, optimizer = super().prepare(model, optimizer, make_optimizer)
        engine = model
        base = getattr(engine.optimizer, "optimizer", engine.optimizer)
        if isinstance(base, MuonWithAdamW):
            base.flat_layouts.update(flat_layouts(engine.optimizer))
        return model, optimizer

    def micro_batch(self, model, last: bool):
        # The engine would divide by its accumulation steps again, and Accelerate's wrapper
        # would step it after every micro-batch: the boundary is ours, the loss already
        # normalised.
        model.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, model, loss: torch.Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)

    def clip_and_step(self, model, optimizer, max_norm: float, fp16: bool,
                      sums: torch.Tensor) -> "StepResult":
        # The engine clips (gradient_clipping = --max_grad_norm), steps and zeroes the gradients
        # itself; only its fp16 loss scaler skips overflowing steps, so under bf16/fp32 a
        # non-finite step is counted and --max_bad_steps stops the run, but not undone.
        model.step()
        norm = model.get_global_grad_norm()  # None where the engine did not compute one
        nll, labels, tokens, stop = sums.tolist()
        loss = nll / max(labels, 1)
        grad_norm = float("nan") if norm is None else float(norm)
        finite = math.isfinite(loss) and (norm is None or math.isfinite(grad_norm))
        return StepResult(nll, int(labels), int(tokens), grad_norm, finite, stop > 0)

    def full_model(self, model):
        """Every weight as the optimizer's fp32 master, gathered from the ranks' partitions
        (under bf16/fp16 the engine's module holds 16-bit copies, and under ZeRO-3 only a
        slice of each), loaded into a fresh fp32 copy on the main process."""
        inner = self.accelerator.unwrap_model(model)
        state = _fp32_masters(inner)
        if state is None:  # an engine without fp32 masters to read: its (gathered) weights
            if self.stage != 3:
                return inner if self.accelerator.is_main_process else None
            state = self.accelerator.get_state_dict(model)
        if not self.accelerator.is_main_process:
            return None
        return plain_copy(type(inner), inner, state)

    def load_state(self, model, optimizer, state_dir: Path,
                   saved_world_size: int | None = None) -> None:
        """Engine (module, fp32 masters, optimizer partitions, step counts) and RNG states.

        On as many processes as saved (or `saved_world_size` None): Accelerate's load, each rank
        reading its own partition files. On a different number under ZeRO, the partitions are
        re-cut: the main process converts the checkpoint into a universal one (once, cached in
        `state_dir/universal/`), and every engine loads its new partition from that with
        DeepSpeed's universal loading switched on for this one load only, so later saves are
        ordinary checkpoints again. ZeRO-1 under bf16 is DeepSpeed's BF16_Optimizer (the
        runtime asks for fp32 gradient accumulation), whose partitions take the same universal
        path. Without ZeRO (stage 0: fp32, fp16, or bf16 with bf16 accumulation, the only bf16
        DeepSpeed 0.19 allows there) the engine saves full states and the ordinary load serves
        any number of processes (checked by hand on CPU, fp32, 1 -> 2 and 2 -> 1).
        """
        world = self.topology.world_size
        state_dir = Path(state_dir)
        if saved_world_size is None or saved_world_size == world or self.stage == 0:
            self.accelerator.load_state(str(state_dir))
            reseed_new_rank(state_dir, saved_world_size, self.topology)
            return
        tags = [_ds_tag(i) for i in range(len(self.accelerator._models))]
        universal = _universal_checkpoint(state_dir, tags, saved_world_size, self.topology)
        engines = self.accelerator._models
        # Accelerate's load_state as it is (RNG states, step, scaler, custom objects), except
        # that its call of each engine's load_checkpoint(state_dir, tag) reads the universal
        # folder of that tag instead. Patched on the instances, removed in any case.
        for engine in engines:
            engine.load_checkpoint = _universal_loader(engine, universal)
        try:
            self.accelerator.load_state(str(state_dir))
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"could not load the DeepSpeed checkpoint {state_dir} saved on "
                             f"{saved_world_size} processes into {world} ({first_line(e)}); "
                             f"resume with {saved_world_size} processes") from e
        finally:
            for engine in engines:
                engine.__dict__.pop("load_checkpoint", None)
        reseed_new_rank(state_dir, saved_world_size, self.topology)

    def synced_generation(self) -> bool:
        return self.stage == 3 and self.topology.distributed

    def describe(self) -> dict:
        return {"zero_stage": self.stage, "deepspeed_config": self.config}


    @staticmethod
    def memory_terms(shape, s, m) -> None:
        """--dry_run's model-state terms per GPU, by ZeRO stage (`s.shard`), precision and
        offload: the 16-bit engine model over fp32 master partitions, or fp32 throughout."""
        add, part, c, dt, masters, opt = m
        p, n, z = shape.params, s.num_gpus, s.shard
        if s.half:
            add("weights", f"{dt} weights (the engine's model)", 2 * p / part(3), "params", 3)
            add("optimizer", f"fp32 master weights{masters}", 4 * p / part(1), "optimizer", 1)
            add("optimizer", opt.state, opt.state_bytes * p / part(1), "optimizer", 1)
            if (s.grad_accum_dtype or s.precision) == "fp32":
                # data_types.grad_accum_dtype fp32 (with communication_data_type fp32, so
                # the reduction sums in fp32 too). ZeRO-1 then runs DeepSpeed's BF16_Optimizer
                # (bf16), or keeps fp32 grad_accum tensors beside the fp16 gradients (fp16): a
                # full-size fp32 buffer besides the 16-bit gradients, not partitioned; ZeRO-2/3
                # accumulate each rank's partition in fp32 and need no fp32 copy for the step.
                if z <= 1:
                    add("gradients", f"{dt} gradients", 2 * p)
                    add("gradients", "fp32 gradient accumulation buffer (grad_accum_dtype fp32)",
                        4 * p)
                else:
                    add("gradients", "fp32 gradient partitions (grad_accum_dtype fp32)",
                        4 * p / n, "optimizer", 2)
            else:
                # gradients accumulate in the model's dtype; the step casts its partition to
                # fp32. Partitioned (ZeRO-2/3), they are kept where the optimizer is (host if
                # offloaded).
                add("gradients", f"{dt} gradients", 2 * p / part(2),
                    "optimizer" if z >= 2 else None, 2)
                add("gradients", "fp32 gradients for the optimizer step", 4 * p / part(1),
                    "optimizer", 1)
        else:
            add("weights", f"fp32 weights{masters}", 4 * p / part(3), "params", 3)
            add("gradients", "fp32 gradients", 4 * p / part(2), None, 2)
            add("optimizer", opt.state, opt.state_bytes * p / part(1), "optimizer", 1)

    @classmethod
    def weights_from_state(cls, state_dir: Path) -> dict:
        cls._saved(state_dir, f"{ZERO_TAG}/*_model_states.pt")
        return _zero_weights(Path(state_dir))


def deepspeed_config_file(cfg: TrainingConfig) -> str | None:
    """`--deepspeed`, else the JSON file `accelerate launch` passed on in the environment."""
    if cfg.deepspeed:
        return cfg.deepspeed
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
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
        "train_batch_size": (cfg.global_batch(world_size), "per-device batch x accumulation x "
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


def flat_layouts(zero) -> dict:
    """{id(flat fp32 partition): FlatLayout} for the Muon groups of a ZeRO-1/2 optimizer
    (DeepSpeedZeroOptimizer, or BF16_Optimizer: ZeRO-1 under bf16), read from where DeepSpeed
    0.19 flattened each group: the matrices in its order, at its offsets (with the padding it
    puts between them), cut into equal partitions over the group's data-parallel ranks."""
    out = {}
    for i, group in enumerate(zero.optimizer.param_groups):
        if not group.get("muon"):
            continue
        if hasattr(zero, "round_robin_bit16_offsets"):  # stage_1_and_2.py
            offsets = zero.round_robin_bit16_offsets[i]
            shapes = [m.shape for m in zero.round_robin_bit16_meta[i]]
            partition = zero.partition_size[i]
        elif hasattr(zero, "fp32_groups_flat_partition"):  # bf16_optimizer.py: no gaps
            shapes = [p.shape for p in zero.bf16_groups[i]]
            offsets = [sum(s.numel() for s in shapes[:j]) for j in range(len(shapes))]
            partition = zero.fp32_groups_flat_partition[i].numel()
        else:
            raise RuntimeError(f"--optim muon: {type(zero).__name__} is not a ZeRO-1/2 "
                               "optimizer whose partitions this run knows how to read")
        pg = zero.real_dp_process_group[i]
        (flat,) = group["params"]
        out[id(flat)] = FlatLayout(tuple(int(o) for o in offsets), tuple(shapes), int(partition),
                                   torch.distributed.get_rank(pg),
                                   torch.distributed.get_world_size(pg), pg)
        assert flat.numel() == partition, (flat.numel(), partition)
    return out


def deepspeed_device() -> None:
    """Point DeepSpeed at the CPU where there is no CUDA (its own detection looks for CUDA)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def single_process_group_env() -> None:
    """The variables torchrun would set, for a one-process group on a free local port."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def _ds_tag(index: int) -> str:
    """The folder Accelerate's save_state has engine number `index` save into (its
    `engine.save_checkpoint(state_dir, tag)`): state/pytorch_model/, state/pytorch_model_1/..."""
    from accelerate.utils import MODEL_NAME

    return MODEL_NAME if index == 0 else f"{MODEL_NAME}_{index}"


def _universal_checkpoint(state_dir: Path, tags: list[str], saved: int,
                         topology: Topology) -> Path:
    """`state_dir/universal/`, holding each tag's DeepSpeed checkpoint converted to a universal
    one (collective: every rank calls it). The main process converts, once: into a temporary
    sibling folder renamed into place when complete, so that a folder cut short by a crash is
    never read, and an existing `universal/` is reused. The other ranks wait for it; a failed
    conversion is one UsageError on every rank."""
    final, world = state_dir / UNIVERSAL_DIR, topology.world_size
    error = None
    if topology.is_main and not final.is_dir():
        error = _convert_to_universal(state_dir, tags, final)
    if world > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise UsageError(f"could not convert the DeepSpeed checkpoint {state_dir} saved on "
                         f"{saved} processes for {world} ({error}); resume with {saved} "
                         "processes")
    return final


def _convert_to_universal(state_dir: Path, tags: list[str], final: Path) -> str | None:
    """Run DeepSpeed's ds_to_universal on each tag folder into a temporary folder, then rename it
    to `final`. Returns None, or the first line of what went wrong."""
    import argparse
    import contextlib
    import io
    import shutil
    import tempfile

    from deepspeed.checkpoint import ds_to_universal

    tmp = Path(tempfile.mkdtemp(prefix=f".{UNIVERSAL_DIR}.", suffix=".tmp", dir=state_dir))
    try:
        for tag in tags:
            if not (state_dir / tag).is_dir():
                return f"no {tag}/ folder in it"
            # in this process, one worker each: no process pool inside a torchrun rank.
            # inject_missing_state: ZeRO-1/2 engines of a plain model record no
            # universal_checkpoint_info (only Megatron-style models do), which the converter
            # otherwise requires; the empty default is right for a model without tensor or
            # pipeline parallelism.
            args = argparse.Namespace(input_folder=str(state_dir / tag),
                                      output_folder=str(tmp / tag), num_extract_workers=1,
                                      num_merge_workers=1, keep_temp_folder=False, strict=True,
                                      inject_missing_state=True)
            log = io.StringIO()  # its progress prints and bars, kept out of the run's output
            muon = set()
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                    _muon_momentum_as_adam_moments(muon):
                ds_to_universal.main(args)
            for name in muon:  # each Muon matrix's momentum, under its own name again
                folder = tmp / tag / "zero" / name
                (folder / "exp_avg.pt").rename(folder / f"{MUON_STATE}.pt")
                (folder / "exp_avg_sq.pt").unlink()
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # else: made meanwhile by another job, as good as ours
                raise
    except Exception as e:  # of any kind: the other ranks wait for the verdict
        return f"{type(e).__name__}: {first_line(e)}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


@contextmanager
def _muon_momentum_as_adam_moments(names: set):
    """DeepSpeed 0.19.8's ds_to_universal carries AdamW's state only (`exp_avg` and
    `exp_avg_sq` are named in it): while it runs, a partition of Muon's momentum is read as
    `exp_avg` (with zeros for `exp_avg_sq`), and the names of its matrices are added to
    `names`, so the caller can name their files back. The universal loader then restores
    whatever state files it finds, Muon's momentum among them."""
    from deepspeed.checkpoint.constants import (BASE_OPTIMIZER_STATE, OPTIMIZER_STATE_DICT,
                                                PARAM_SLICE_MAPPINGS)
    from deepspeed.checkpoint.deepspeed_checkpoint import DeepSpeedCheckpoint

    read = DeepSpeedCheckpoint.get_zero_checkpoint_state

    def get_zero_checkpoint_state(self, *args, **kwargs):
        sd = read(self, *args, **kwargs)
        optimizer = sd[OPTIMIZER_STATE_DICT]
        for group, state in optimizer[BASE_OPTIMIZER_STATE]["state"].items():
            if MUON_STATE in state and "exp_avg" not in state:
                state["exp_avg"] = state[MUON_STATE]
                state["exp_avg_sq"] = torch.zeros_like(state[MUON_STATE])
                names.update(optimizer[PARAM_SLICE_MAPPINGS][group])
        return sd

    DeepSpeedCheckpoint.get_zero_checkpoint_state = get_zero_checkpoint_state
    try:
        yield
    finally:
        DeepSpeedCheckpoint.get_zero_checkpoint_state = read


def _universal_loader(engine, universal: Path):
    """`engine.load_checkpoint` for Accelerate's load_state: loads `universal/<tag>` with the
    engine's universal loading on (the `checkpoint: {load_universal: true}` config flag, which
    DeepSpeed reads from `engine._config.load_universal_checkpoint` while loading), and restores
    the flag after."""
    load = type(engine).load_checkpoint

    def load_checkpoint(load_dir, tag=None, **kwargs):
        config = engine._config
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = True
        try:
            path, client_state = load(engine, str(universal), tag, **kwargs)
        finally:
            config.load_universal_checkpoint = before
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {universal / str(tag)}")
        _repair_optimizer_state(engine, universal / str(tag))
        return path, client_state

    return load_checkpoint


def _repair_optimizer_state(engine, folder: Path) -> None:
    """Undo what DeepSpeed 0.19.8's universal loading gets wrong with more than one optimizer
    param group (ours: matrices with weight decay, biases and LayerNorms without).

    - Step counts: the ZeRO-3 loader gives every fp32 partition the same `step` tensor object,
      which torch's Adam increments in place, so each optimizer step would count once per
      group and the later groups' bias corrections would be wrong. Every partition gets its
      own copy (harmless under ZeRO-1/2, whose loader reads one per group).
    - Hyperparameters: the ZeRO-3 loader copies the first group's into every group, so the
      no-decay group would get the matrices' weight decay (the ZeRO-1/2 loader restores them
      group by group). They are set again from `zero/optimizer_state.pt`, where the converter
      keeps every group's.
    """
    base = engine.optimizer.optimizer
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    if not engine.zero_optimization_partition_weights():
        return
    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu",
                       weights_only=False)["param_groups"]
    if len(saved) != len(base.param_groups):
        raise RuntimeError(f"the checkpoint has {len(saved)} optimizer param groups, the "
                           f"optimizer {len(base.param_groups)}")
    for group, values in zip(base.param_groups, saved):
        group.update({k: v for k, v in values.items() if k != "params"})


def _fp32_masters(inner) -> dict | None:
    """Under DeepSpeed, every weight as the optimizer's fp32 master copy, gathered from the
    ranks' partitions (collective: every rank calls it). None where the engine keeps none."""
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in inner.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:
            return None
        state[name] = full.detach().float().cpu()
    return state



def _zero_weights(state_dir: Path) -> dict:
    """fp32 weights of a DeepSpeed ZeRO checkpoint, its per-rank partitions joined."""
    deepspeed_device()
    if list((state_dir / ZERO_TAG).glob("bf16_*_optim_states.pt")):
        return _bf16_optimizer_weights(state_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=ZERO_TAG)


def _bf16_optimizer_weights(state_dir: Path) -> dict:
    """fp32 masters of a checkpoint written by DeepSpeed's BF16_Optimizer (ZeRO-1 under bf16),
    whose partition files zero_to_fp32 does not read: DeepSpeed's universal converter (the
    same one a resume on a new number of processes uses) writes each parameter whole, as
    `zero/<name>/fp32.pt`, into a temporary folder."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=state_dir.parent.parent) as tmp:
        universal = Path(tmp) / "universal"
        error = _convert_to_universal(state_dir, [ZERO_TAG], universal)
        if error:
            raise UsageError(f"could not read the bf16 DeepSpeed checkpoint {state_dir} "
                             f"({error}); export a checkpoint saved by ZeRO-2 or -3")
        params = universal / ZERO_TAG / "zero"
        state = {p.name: torch.load(p / "fp32.pt", weights_only=False)["param"]
                 for p in params.iterdir() if (p / "fp32.pt").is_file()}
    # a tied weight (lm_head.weight of GPT-2) is written too, from its own, stale copy: it
    # is the one it is tied to, as zero_to_fp32 makes it
    model_states = next((state_dir / ZERO_TAG).glob("*_model_states.pt"))
    shared = torch.load(model_states, weights_only=False, map_location="cpu").get("shared_params")
    for alias, source in (shared or {}).items():
        if source in state:
            state[alias] = state[source]
    return state


