"""DDP through Accelerate, and a single process: every rank holds every weight.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --output_dir outputs/ddp

Accelerate wraps the model (on CPU under torchrun: gloo DDP, see clm/runtime.py); gradients are
all-reduced on the last micro-batch of a step only. The training state is Accelerate's
`save_state` folder, whose `model.safetensors` holds every weight.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from .base import Backend, autocast_outputs


class DDPBackend(Backend):
    """One process, or DDP through Accelerate (also what MULTI_CPU under torchrun is)."""

    name = "ddp"
    shards_parameters = False

    def prepare(self, model, optimizer, make_optimizer=None):
        model, optimizer = self.accelerator.prepare(model, optimizer)
        autocast_outputs(self.accelerator.unwrap_model(model), self.accelerator)
        return model, optimizer

    def micro_batch(self, model, last: bool):
        # only the last micro-batch of a step all-reduces gradients across ranks
        return nullcontext() if last else self.accelerator.no_sync(model)

    @staticmethod
    def memory_terms(shape, s, m) -> None:
        """--dry_run's model-state terms per GPU (`plan.memory_terms` adds activations and
        logits): every rank holds fp32 weights, gradients (and DDP's bucket copy) and the
        optimizer's state whole."""
        add, part, c, dt, masters, opt = m
        p, n = shape.params, s.num_gpus
        add("weights", f"fp32 weights, the masters the optimizer updates{masters}", 4 * p)
        if s.half:
            # cached by autocast through the forward pass and kept by autograd for the backward
            add("weights", f"{dt} autocast copies of the weights", 2 * p)
        add("gradients", "fp32 gradients", 4 * p)
        if n > 1:  # Accelerate's default gradient_as_bucket_view=False: a second copy
            add("gradients", "DDP's gradient buckets", 4 * p)
        add("optimizer", opt.state, opt.state_bytes * p)

    @classmethod
    def weights_from_state(cls, state_dir: Path) -> dict:
        from safetensors.torch import load_file

        return load_file(cls._saved(state_dir, "model.safetensors"))
