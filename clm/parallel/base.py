"""The interface every distributed backend implements, and what they share.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --output_dir outputs/ddp

A `Backend` is made once per run (`clm.parallel.make_backend`, from `clm.parallel.choose`) and
handed to whoever needs it: the loop (micro-batch context, backward, clip and step), the
checkpoints (save and load the training state, the full model for the HF folder), the
evaluations (whether generation must run in lockstep) and the exporter (weights read back from
a saved state without a process group). It carries the run's `accelerator` and `topology`, so
nothing downstream reads the rank on its own. What it holds by default is what every backend
but DDP's wrapper shares: backward through Accelerate, clipping and a skipped step on a
non-finite loss or gradient, Accelerate's save/load of the training state.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import UsageError
from .launch import Topology


class StepResult(NamedTuple):
    """What an optimizer step reports, read from the device in its one host sync."""

    nll: float          # summed NLL of the step's label tokens, all ranks
    labels: int         # label tokens, all ranks
    tokens: int         # input tokens, all ranks
    grad_norm: float    # before clipping (nan where the engine computed none)
    stepped: bool       # False: a non-finite loss or gradient, the update skipped
    stop: bool          # some rank was asked to stop (SIGTERM/SIGINT)


class Backend:
    """One run's distributed backend. Subclasses set `name` (what the checkpoint manifest
    records, and what export looks up) and implement `prepare` and `micro_batch`."""

    name = "base"
    shards_parameters = False  # True: no rank holds every weight (ZeRO-3, FSDP)

    def __init__(self, accelerator, topology: Topology):
        self.accelerator = accelerator
        self.topology = topology

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def fused_optimizer(self) -> bool:
        """Whether AdamW should be fused (one kernel over all parameters instead of a loop of
        small ops), decided from the device, since the optimizer is built before `prepare`
        moves the model. CUDA and CPU have fused kernels (tiny preset on 2 CPU cores: 1.2 ms a
        step against 7 ms for the default)."""
        return self.accelerator.device.type in ("cuda", "cpu")

    def prepare(self, model, optimizer, make_optimizer=None):
        """(model, optimizer) ready to train: wrapped, sharded or made an engine."""
        raise NotImplementedError

    def micro_batch(self, model, last: bool):
        """The context one micro-batch's forward and backward run in; `last` closes the step
        (where gradients are reduced over the ranks)."""
        raise NotImplementedError

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
        reseed_new_rank(state_dir, saved_world_size, self.topology)

    def synced_generation(self) -> bool:
        """Whether generating needs every rank in lockstep (weights gathered per forward)."""
        return False

    def describe(self) -> dict:
        """What run_config.yaml records of the backend beyond its name."""
        return {}

    @staticmethod
    def memory_terms(shape, s, m) -> None:
        """The bytes per GPU of the model's states (weights, gradients, optimizer state) as
        this backend keeps them, for `--dry_run`: each term given to `m.add(kind, what,
        bytes, offload, stage)` (`plan.MemoryContext`), for the model `shape` under the
        choices `s` (plan.Setup: precision, GPUs, ZeRO stage, offload, accumulation)."""
        raise NotImplementedError

    @classmethod
    def weights_from_state(cls, state_dir: Path) -> dict:
        """Every weight (fp32 masters where the backend keeps them) of a training state this
        backend saved, read without a process group or a GPU: what `python -m clm.export`
        builds the exported model from."""
        raise NotImplementedError

    @classmethod
    def _saved(cls, state_dir: Path, pattern: str) -> Path:
        """The file of `state_dir` matching `pattern` that this backend's states hold; a
        UsageError (naming it) where there is none."""
        found = sorted(Path(state_dir).glob(pattern))
        if not found:
            raise UsageError(f"{state_dir} has no {pattern}, which a training state saved by "
                             f"the {cls.name} backend holds (pass a complete checkpoint)")
        return found[0]


def autocast_outputs(model, accelerator) -> None:
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


def reseed_new_rank(state_dir: Path, saved_world_size: int | None, topology: Topology) -> None:
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
    rank, world = topology.rank, topology.world_size
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
    """The 32-bit seed `reseed_new_rank` gives `rank` for the checkpoint in `state_dir`."""
    digest = hashlib.sha256(f"rank {rank}".encode())
    main_state = Path(state_dir) / RNG_FILE.format(0)
    if main_state.is_file():
        from accelerate.utils import load

        saved = load(main_state).get("torch_manual_seed")
        if saved is not None:
            digest.update(bytes(saved.cpu().numpy()))
    return int.from_bytes(digest.digest()[:4], "little")



def plain_copy(cls, inner, state: dict):
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

