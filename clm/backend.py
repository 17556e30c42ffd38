"""Distributed backends behind one interface: DDP (and a single process), DeepSpeed ZeRO, FSDP2.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --fsdp full_shard --output_dir outputs/fsdp

The loop, checkpoints, outputs and export ask the run's backend (`backend_of(accelerator)`,
chosen once in `runtime.make_accelerator`) to prepare the model, run a micro-batch's backward,
clip and step, gather the full model for the HF folder, and save or load the training state;
none of them asks which backend it is. What differs:

- DDP: Accelerate wraps the model; gradients are all-reduced on the last micro-batch only.
- DeepSpeed: the engine owns clipping, stepping and the accumulation boundary (set by us, with
  the already token-normalised loss); the HF folders get the optimizer's fp32 masters.
- FSDP2: `torch.distributed.fsdp.fully_shard` on each transformer block, then on the model
  (applied here rather than through Accelerate, so the CPU tests under torchrun/gloo run the
  same code as GPUs); parameters are DTensors sharded over the ranks, `MixedPrecisionPolicy`
  computes in bf16/fp16 with fp32 masters and fp32 gradient reduction; the training state is a
  `torch.distributed.checkpoint` folder (`state/dcp/`), which loads on any number of ranks.

A training state loads on a different number of processes than it was saved on
(`load_state(..., saved_world_size=N)`): DDP's states are full and FSDP's DCP folder reshards as
it reads; DeepSpeed ZeRO's partitions are converted once into a universal checkpoint
(`state/universal/`, DeepSpeed's `ds_to_universal`) that every rank reads its new partition
from. Ranks that did not exist at save time get a deterministic RNG seed (`_reseed_new_rank`).
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch

from .config import UsageError, first_line
from .runtime import dist_info

class StepResult(NamedTuple):
    """What an optimizer step reports, read from the device in its one host sync."""

    nll: float          # summed NLL of the step's label tokens, all ranks
    labels: int         # label tokens, all ranks
    tokens: int         # input tokens, all ranks
    grad_norm: float    # before clipping (nan where the engine computed none)
    stepped: bool       # False: a non-finite loss or gradient, the update skipped
    stop: bool          # some rank was asked to stop (SIGTERM/SIGINT)


DCP_DIR = "dcp"  # FSDP2's sharded training state, under a checkpoint's state/
UNIVERSAL_DIR = "universal"  # DeepSpeed's universal checkpoint of a state/, made on demand


class DDPBackend:
    """One process, or DDP through Accelerate (also what MULTI_CPU under torchrun is)."""

    name = "ddp"
    shards_parameters = False  # every rank holds every weight

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def fused_optimizer(self) -> bool:
        """Whether AdamW should be fused (one kernel over all parameters instead of a loop of
        small ops), decided from the device, since the optimizer is built before `prepare`
        moves the model. CUDA and CPU have fused kernels (tiny preset on 2 CPU cores: 1.2 ms a
        step against 7 ms for the default)."""
        return self.accelerator.device.type in ("cuda", "cpu")

    def prepare(self, model, optimizer, make_optimizer=None):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        _autocast_outputs(self.accelerator.unwrap_model(model), self.accelerator)
        return model, optimizer

    def micro_batch(self, model, last: bool):
        # only the last micro-batch of a step all-reduces gradients across ranks
        return nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_and_step(self, model, optimizer, max_norm: float, fp16: bool,
                      sums: torch.Tensor) -> "StepResult":
        """Clip and step unless the loss or gradient is non-finite; one host sync: `sums`
        (loop.forward_backward's [NLL, label tokens, input tokens, ranks asking to stop]) and
        the gradient norm are read together."""
        norm = self._norm(model, max_norm)
        values = torch.cat([sums, norm.reshape(1).to(sums.device, torch.float64)]).tolist()
        nll, labels, tokens, stop, grad_norm = values
        loss = nll / max(labels, 1)
        # Under fp16 the grad scaler skips overflowing steps itself; those are not bad steps.
        finite = math.isfinite(loss) and (math.isfinite(grad_norm) or fp16)
        if finite:
            optimizer.step()
        elif self.accelerator.scaler is not None:
            # Skip the update (one bad batch must not poison the weights), but close the fp16
            # scaler's step: the gradients were unscaled for the norm, and without update() the
            # next step's unscale_ fails; update() also lowers the scale after an overflow.
            self.accelerator.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(nll, int(labels), int(tokens), grad_norm, finite, stop > 0)

    def _norm(self, model, max_norm: float) -> torch.Tensor:
        """The global gradient norm as a tensor (clipping to `max_norm` when it is > 0)."""
        if max_norm > 0:
            return torch.as_tensor(self.accelerator.clip_grad_norm_(model.parameters(),
                                                                    max_norm))
        self.accelerator.unscale_gradients()  # fp16: the true gradients' norm, not the scaled
        norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        return torch.stack(norms).norm() if norms else torch.zeros(())

    def full_model(self, model):
        """The plain model with every weight, on the main process (None on the others);
        every rank must call it."""
        inner = self.accelerator.unwrap_model(model)
        return inner if self.accelerator.is_main_process else None

    def save_state(self, model, optimizer, state_dir: Path) -> None:
        self.accelerator.save_state(str(state_dir), safe_serialization=True)

    def load_state(self, model, optimizer, state_dir: Path,
                   saved_world_size: int | None = None) -> None:
        """Model, optimizer and RNG states. Saved on `saved_world_size` processes (None: this
        run's number): the states are full (saved by the main process), so any number of
        processes loads them; only a rank that did not exist then has no RNG state."""
        self.accelerator.load_state(str(state_dir))
        _reseed_new_rank(state_dir, saved_world_size)

    def synced_generation(self) -> bool:
        """Whether generating needs every rank in lockstep (weights gathered per forward)."""
        return False

    def describe(self) -> dict:
        return {}


class DeepSpeedBackend(DDPBackend):
    """DeepSpeed ZeRO-1/2/3 through Accelerate's DeepSpeed plugin."""

    name = "deepspeed"

    def __init__(self, accelerator):
        super().__init__(accelerator)
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
        return _plain_copy(type(inner), inner, state)

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
        world = dist_info()[1]
        state_dir = Path(state_dir)
        if saved_world_size is None or saved_world_size == world or self.stage == 0:
            self.accelerator.load_state(str(state_dir))
            _reseed_new_rank(state_dir, saved_world_size)
            return
        tags = [_ds_tag(i) for i in range(len(self.accelerator._models))]
        universal = _universal_checkpoint(state_dir, tags, saved_world_size, world)
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
        _reseed_new_rank(state_dir, saved_world_size)

    def synced_generation(self) -> bool:
        return self.stage == 3 and dist_info()[1] > 1

    def describe(self) -> dict:
        return {"zero_stage": self.stage, "deepspeed_config": self.config}


class FSDPBackend(DDPBackend):
    """FSDP2 (`fully_shard`): each transformer block its own shard group, then the model."""

    name = "fsdp"
    shards_parameters = True

    def __init__(self, accelerator, mixed_precision: str = "no"):
        super().__init__(accelerator)
        self.mixed_precision = mixed_precision
        self.model_class = None
        # fp16 needs loss scaling, which Accelerate's scaler (built for its own DDP wrapper)
        # does not do here: the sharded scaler combines the ranks' overflow checks, so every
        # rank skips the same steps. Saved with the training state (a checkpointed object).
        self.scaler = None
        if mixed_precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(accelerator.device.type)
            accelerator.register_for_checkpointing(self.scaler)

    def fused_optimizer(self) -> bool:
        # torch 2.13's fused AdamW takes the sharded scaler's overflow flag, shaped [1], where
        # it expects a scalar ("output with shape [] doesn't match the broadcast shape [1]")
        return super().fused_optimizer() and self.scaler is None

    def prepare(self, model, optimizer, make_optimizer=None):
        """Shard `model` in place and build the optimizer again over its sharded parameters
        (`make_optimizer(model)`): the one given holds the unsharded ones."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if make_optimizer is None:
            raise ValueError("FSDP builds the optimizer after sharding: pass make_optimizer")
        device = self.accelerator.device
        model.to(device)
        self.model_class = type(model)
        mesh = init_device_mesh(device.type, (dist_info()[1],))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype \
            else MixedPrecisionPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        return model, make_optimizer(model)

    def micro_batch(self, model, last: bool):
        # gradients are reduce-scattered on the last micro-batch only
        model.set_requires_gradient_sync(last)
        return nullcontext()

    def backward(self, model, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def clip_and_step(self, model, optimizer, max_norm: float, fp16: bool,
                      sums: torch.Tensor) -> "StepResult":
        """As DDP's; under fp16 the sharded scaler unscales before the norm, skips a step with
        an overflow on any rank (not a bad step: the scale is lowered) and always updates its
        scale, also after a non-finite loss, whose step is skipped and counted as bad."""
        if self.scaler is None:
            return super().clip_and_step(model, optimizer, max_norm, fp16, sums)
        self.scaler.unscale_(optimizer)
        values = torch.cat([sums, self._norm(model, max_norm).reshape(1).to(
            sums.device, torch.float64)]).tolist()
        nll, labels, tokens, stop, grad_norm = values
        finite = math.isfinite(nll / max(labels, 1))
        if finite:
            self.scaler.step(optimizer)  # skipped by the scaler after an overflow
        self.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return StepResult(nll, int(labels), int(tokens), grad_norm, finite, stop > 0)

    def _norm(self, model, max_norm: float) -> torch.Tensor:
        # the gradients are DTensor shards: the norm is reduced over the ranks, then clipped
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                              max_norm if max_norm > 0 else float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def full_model(self, model):
        """Every weight gathered in full (collective), loaded into a plain copy on the main
        process."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
        if not self.accelerator.is_main_process:
            return None
        return _plain_copy(self.model_class or type(model), model, state)

    def save_state(self, model, optimizer, state_dir: Path) -> None:
        """RNG states through Accelerate (no model registered with it), model and optimizer as
        one torch.distributed.checkpoint folder, each rank writing its shards."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.accelerator.save_state(str(state_dir), safe_serialization=True)
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state},
                 checkpoint_id=str(Path(state_dir) / DCP_DIR))

    def load_state(self, model, optimizer, state_dir: Path,
                   saved_world_size: int | None = None) -> None:
        """Loads on any number of ranks: torch.distributed.checkpoint reshards as it reads, so
        `saved_world_size` matters only for the RNG state of a rank that did not exist then."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        self.accelerator.load_state(str(state_dir))
        _reseed_new_rank(state_dir, saved_world_size)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(Path(state_dir) / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def synced_generation(self) -> bool:
        return dist_info()[1] > 1

    def describe(self) -> dict:
        return {"fsdp": "full_shard", "fsdp_version": 2,
                "fsdp_mixed_precision": self.mixed_precision}


def _autocast_outputs(model, accelerator) -> None:
    """Keep Accelerate's autocast around `model.forward` but drop its fp32 conversion of the
    outputs. Under bf16/fp16, `prepare()` wraps forward in autocast and then in
    `convert_outputs_to_fp32`, so the logits reached the loss as an fp32 copy (4 bytes x tokens
    x vocabulary, ~3.1 GiB at 16 x 1024 x 50304, and as much again for its gradient) and the
    loss's chunked upcast (loop.nll_sum) never ran. The wrapper is rebuilt as Accelerate builds
    it, minus that last layer, so `unwrap_model(keep_fp32_wrapper=False)` still finds the
    original forward under it."""
    original = model.__dict__.get("_original_forward")
    if original is None or not accelerator.native_amp:
        return
    from types import MethodType

    from accelerate.utils import get_mixed_precision_context_manager

    autocast = get_mixed_precision_context_manager(accelerator.native_amp,
                                                   accelerator.autocast_handler)
    model.forward = MethodType(autocast(original.__func__), model)


def transformer_blocks(model) -> list:
    """The repeated blocks to shard one by one: the model's `_no_split_modules` classes
    (GPT2Block for GPT-2), found anywhere in it (under a peft wrapper too)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    inner = getattr(model, "base_model", model)
    names |= set(getattr(getattr(inner, "model", inner), "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class to shard "
                         "(_no_split_modules)")
    return blocks


RNG_FILE = "random_states_{}.pkl"  # Accelerate's per-rank RNG states, in a state/ folder


def _reseed_new_rank(state_dir: Path, saved_world_size: int | None) -> None:
    """Seed the RNGs (Python, NumPy, torch and every CUDA device) of a rank that has no saved
    RNG state, when the run has more processes than the checkpoint was saved on.

    Accelerate's load_state only logs "Could not load random states" for such a rank and leaves
    its generators as they were (seeded by the run's start-up). The seed instead comes from the
    checkpoint: a hash of the main process's saved torch RNG state and of this rank. So a
    resume is reproducible (the same checkpoint and rank give the same stream), the new ranks'
    streams differ from each other and from rank 0's, and resuming from another checkpoint
    gives new streams rather than replaying the ones the run started with. Ranks with a saved
    state (and every rank when the world size is unchanged) keep what Accelerate restored.
    """
    rank, world = dist_info()
    state_dir = Path(state_dir)
    if saved_world_size in (None, world) or (state_dir / RNG_FILE.format(rank)).is_file():
        return
    seed = rank_seed(state_dir, rank)
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and all CUDA devices


def rank_seed(state_dir: Path, rank: int) -> int:
    """The 32-bit seed `_reseed_new_rank` gives `rank` for the checkpoint in `state_dir`."""
    digest = hashlib.sha256(f"rank {rank}".encode())
    main_state = Path(state_dir) / RNG_FILE.format(0)
    if main_state.is_file():
        from accelerate.utils import load

        saved = load(main_state).get("torch_manual_seed")
        if saved is not None:
            digest.update(bytes(saved.cpu().numpy()))
    return int.from_bytes(digest.digest()[:4], "little")


def _ds_tag(index: int) -> str:
    """The folder Accelerate's save_state has engine number `index` save into (its
    `engine.save_checkpoint(state_dir, tag)`): state/pytorch_model/, state/pytorch_model_1/..."""
    from accelerate.utils import MODEL_NAME

    return MODEL_NAME if index == 0 else f"{MODEL_NAME}_{index}"


def _universal_checkpoint(state_dir: Path, tags: list[str], saved: int, world: int) -> Path:
    """`state_dir/universal/`, holding each tag's DeepSpeed checkpoint converted to a universal
    one (collective: every rank calls it). The main process converts, once: into a temporary
    sibling folder renamed into place when complete, so that a folder cut short by a crash is
    never read, and an existing `universal/` is reused. The other ranks wait for it; a failed
    conversion is one UsageError on every rank."""
    final = state_dir / UNIVERSAL_DIR
    error = None
    if dist_info()[0] == 0 and not final.is_dir():
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
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                ds_to_universal.main(args)
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


def _plain_copy(cls, inner, state: dict):
    """A fresh fp32 `cls` of `inner`'s config holding `state` (tied weights re-tied)."""
    plain = cls(inner.config)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if inner.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathered weights do not match the model: missing "
                           f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    plain.tie_weights()
    plain.generation_config = inner.generation_config
    return plain


def select(accelerator, fsdp: bool = False, mixed_precision: str = "no"):
    """The run's backend, decided here once and kept on the accelerator."""
    from accelerate.utils import DistributedType

    if fsdp:
        backend = FSDPBackend(accelerator, mixed_precision)
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        backend = DeepSpeedBackend(accelerator)
    else:
        backend = DDPBackend(accelerator)
    accelerator.clm_backend = backend
    return backend


def backend_of(accelerator):
    """The backend `select` chose for this accelerator (chosen now for one made elsewhere)."""
    return getattr(accelerator, "clm_backend", None) or select(accelerator)
