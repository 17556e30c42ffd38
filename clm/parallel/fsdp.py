"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block its own shard group, then
the model.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --fsdp full_shard --output_dir outputs/fsdp
    accelerate launch --config_file accelerate_configs/fsdp.yaml train_clm.py --config configs/gpt2_124m_owt.yaml

Applied here rather than through Accelerate, so the CPU tests under torchrun/gloo run the same
code as GPUs: parameters are DTensors sharded over the ranks, `MixedPrecisionPolicy` computes
in bf16/fp16 with fp32 masters and fp32 gradient reduction; the training state is a
`torch.distributed.checkpoint` folder (`state/dcp/`), which loads on any number of ranks (it
reshards as it reads).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch

from .base import Backend, StepResult, plain_copy, reseed_new_rank, transformer_blocks

DCP_DIR = "dcp"  # FSDP2's sharded training state, under a checkpoint's state/


class FSDPBackend(Backend):
    """FSDP2 (`fully_shard`): each transformer block its own shard group, then the model."""

    name = "fsdp"
    shards_parameters = True

    def __init__(self, accelerator, topology, mixed_precision: str = "no"):
        super().__init__(accelerator, topology)
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
        mesh = init_device_mesh(device.type, (self.topology.dp_world_size,))
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
        return plain_copy(self.model_class or type(model), model, state)

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
        reseed_new_rank(state_dir, saved_world_size, self.topology)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(Path(state_dir) / DCP_DIR))
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])

    def synced_generation(self) -> bool:
        return self.topology.distributed

    def describe(self) -> dict:
        return {"fsdp": "full_shard", "fsdp_version": 2,
                "fsdp_mixed_precision": self.mixed_precision}

    @staticmethod
    def memory_terms(shape, s, m) -> None:
        """--dry_run's model-state terms per GPU: fp32 shards of weights, gradients and
        optimizer state, plus what is gathered or unsharded at the peak."""
        add, part, c, dt, masters, opt = m
        p, n = shape.params, s.num_gpus
        add("weights", f"fp32 weights{masters}", 4 * p / n, stage=3)
        # the root group (embeddings, final norm, a tied head) stays gathered from its forward
        # to its backward; a block is gathered while in use, and the next one is prefetched
        block = shape.largest_block or shape.largest_layer
        add("weights", f"{dt} parameters gathered: the root group's and two blocks'",
            c * (shape.root_params + 2 * block))
        add("gradients", "fp32 gradients", 4 * p / n, stage=3)
        add("gradients", f"one block's unsharded {dt} gradient and its fp32 reduce-scatter "
            "copy", (c + 4) * block)
        if s.accumulation > 1:
            # set_requires_gradient_sync(False) on every micro-batch but the last
            # (parallel.fsdp.FSDPBackend.micro_batch): torch 2.13's FSDPParam keeps each gradient
            # unsharded until the reduce-scatter, upcast to the fp32 reduce_dtype under
            # bf16/fp16 (to_accumulated_grad_if_needed), fp32 as computed without: the whole
            # model's, not 1/N
            add("gradients", "FSDP's unsharded fp32 gradients, accumulated over the "
                "micro-batches", 4 * p)
        add("optimizer", opt.state, opt.state_bytes * p / n, stage=3)

    @classmethod
    def weights_from_state(cls, state_dir: Path) -> dict:
        return _fsdp_weights(cls._saved(state_dir, f"{DCP_DIR}/.metadata").parent)


def _fsdp_weights(dcp_dir: Path) -> dict:
    """Full weights of an FSDP2 checkpoint (a torch.distributed.checkpoint folder of sharded
    model and optimizer states), read without a process group."""
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(dcp_dir), f"{tmp}/state.pt")
        saved = torch.load(f"{tmp}/state.pt", weights_only=False)
    return {k: v.float() for k, v in saved["model"].items()}
