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
    def weights_from_state(state_dir: Path) -> dict:
        from safetensors.torch import load_file

        return load_file(DDPBackend._saved(state_dir, "model.safetensors"))
