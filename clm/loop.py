"""The one training loop, shared by pretraining (train_clm.py) and finetuning (run_sft.py).

    python train_clm.py --config configs/demo_cpu.yaml

A batch is `input_ids`, `attention_mask`, `labels` (-100 where there is no loss). Each optimizer
step draws `gradient_accumulation_steps` micro-batches, counts their label tokens on every rank,
and scales each micro-batch's summed NLL by world_size / (global label tokens): after DDP's or
ZeRO's average over ranks the gradient is exactly that of the mean loss over every label token
of the step, however the step is split into micro-batches and ranks. The learning rate is a
function of the optimizer step (warmup then cosine to min_lr), set on the optimizer directly, so
no scheduler object steps once per process behind our back. Under DeepSpeed the engine is given
the same normalised loss and does the clipping and the step.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import TrainingConfig
from .runtime import dist_info, is_deepspeed


@dataclass
class LoopState:
    """The loop's counters; with the model, optimizer and data state they define a run."""

    step: int = 0          # optimizer steps taken
    tokens: int = 0        # input tokens consumed, all ranks
    bad_steps: int = 0     # consecutive skipped (non-finite) steps
    skipped: int = 0       # skipped steps in total
    elapsed_s: float = 0.0


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg: TrainingConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not biases, LayerNorms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
        fused=fused)


def _all_reduce_sum(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    if dist_info()[1] > 1:
        torch.distributed.all_reduce(tensor)
    return tensor


def token_nll(model, batch) -> torch.Tensor:
    """Summed next-token NLL of a batch over its label tokens (labels are shifted here)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


def forward_backward(model, micro_batches, accelerator) -> tuple[float, int, int]:
    """One optimizer step's gradients; returns (mean loss over all label tokens, label tokens,
    input tokens), each over all ranks."""
    device = accelerator.device
    micro_batches = [{k: v.to(device, non_blocking=True) for k, v in b.items()}
                     for b in micro_batches]
    counts = torch.tensor([sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches),
                           sum(int(b["attention_mask"].sum()) for b in micro_batches)],
                          dtype=torch.float64, device=device)
    labels, tokens = _all_reduce_sum(accelerator, counts).tolist()
    world = dist_info()[1]
    total = torch.zeros((), dtype=torch.float64, device=device)
    deepspeed = is_deepspeed(accelerator)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        scale = world / max(labels, 1)
        if deepspeed:
            # The engine would divide by its accumulation steps again, and Accelerate's wrapper
            # would step it after every micro-batch; the loss is already normalised.
            model.set_gradient_accumulation_boundary(last)
            nll = token_nll(model, batch)
            model.backward(nll * scale, scale_wrt_gas=False)
        else:
            # Only the last micro-batch all-reduces gradients across ranks.
            with nullcontext() if last else accelerator.no_sync(model):
                nll = token_nll(model, batch)
                accelerator.backward(nll * scale)
        total += nll.detach().double()
    loss = _all_reduce_sum(accelerator, total).item() / max(labels, 1)
    return loss, int(labels), int(tokens)


@torch.no_grad()
def evaluate(model, heldout, batch_size: int, accelerator) -> float | None:
    """Token-weighted mean NLL over the held-out set, each rank taking its share, summed.

    `heldout` is a tensor of packed blocks (pretraining) or a list of batches (finetuning).
    """
    if heldout is None:
        return None
    rank, world = dist_info()
    if isinstance(heldout, torch.Tensor):
        mine = [_block_batch(c) for c in heldout[rank::world].split(batch_size)]
        passes = math.ceil(math.ceil(len(heldout) / world) / batch_size)
        filler = _block_batch(heldout[:1])
    else:
        mine, passes, filler = heldout[rank::world], math.ceil(len(heldout) / world), heldout[0]
    # Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively in
    # each one); a rank whose share is shorter runs its last ones on a batch it does not count.
    sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    model.eval()
    for i in range(passes):
        counted = i < len(mine)
        batch = {k: v.to(accelerator.device) for k, v in (mine[i] if counted else filler).items()}
        with accelerator.autocast():
            nll = token_nll(model, batch).double()
        if counted:
            sums[0] += nll
            sums[1] += (batch["labels"][:, 1:] != -100).sum()
    model.train()
    total, count = _all_reduce_sum(accelerator, sums).tolist()
    return total / count


def _block_batch(blocks: torch.Tensor) -> dict:
    return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks}


def train(cfg: TrainingConfig, accelerator, model, optimizer, batches, state: LoopState, logger,
          evaluate_fn, save_fn=None, stop=None, flops_per_token: float | None = None,
          peak_flops: float | None = None):
    """Run optimizer steps until `cfg.max_steps` or a stop request; `batches` never ends.

    `save_fn(state)` checkpoints (every `save_steps`, and when stopped); `stop.requested()`
    is checked after every step, on every rank alike.
    """
    model.train()
    data = iter(batches)
    window_tokens, window_start = 0, time.perf_counter()
    run_start = time.perf_counter() - state.elapsed_s
    while state.step < cfg.max_steps:
        lr = lr_at(state.step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [next(data) for _ in range(cfg.gradient_accumulation_steps)]
        loss, _, tokens = forward_backward(model, micro, accelerator)
        grad_norm, finite = _optimizer_step(accelerator, model, optimizer, cfg, loss)
        if finite:
            state.bad_steps = 0
        else:
            state.bad_steps += 1
            state.skipped += 1
        state.step += 1
        state.tokens += tokens
        window_tokens += tokens
        state.elapsed_s = time.perf_counter() - run_start
        logger.advance()
        if not finite or state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps:
            now = time.perf_counter()
            tps = window_tokens / max(now - window_start, 1e-9)
            record = {"step": state.step, "tokens": state.tokens,
                      "loss": loss if finite else None, "lr": lr,
                      "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                      "tokens_per_sec": round(tps, 1), "elapsed_s": round(state.elapsed_s, 3)}
            # model FLOPs utilisation per device; None where the peak is unknown (CPUs)
            record["mfu"] = round(flops_per_token * tps / (peak_flops * dist_info()[1]), 4) \
                if flops_per_token and peak_flops else None
            if accelerator.device.type == "cuda":  # this rank's peak, since the start
                record["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            if not finite:
                record["skipped"] = True
            logger.log_train(record)
            window_tokens, window_start = 0, now
        if state.bad_steps >= cfg.max_bad_steps:
            raise FloatingPointError(
                f"{state.bad_steps} optimizer steps in a row had a non-finite loss or gradient "
                f"(last at step {state.step}); lower --learning_rate or check the data")
        if (cfg.eval_steps and state.step % cfg.eval_steps == 0) or state.step == cfg.max_steps:
            eval_loss = evaluate_fn()
            if eval_loss is not None:
                logger.log_eval(state.step, state.tokens, eval_loss)
        saved = bool(save_fn and cfg.save_steps and state.step % cfg.save_steps == 0)
        if saved:
            save_fn(state)
        if stop is not None and stop.requested(accelerator.device):
            if save_fn and not saved:
                save_fn(state)
            break
    return state


def _optimizer_step(accelerator, model, optimizer, cfg: TrainingConfig,
                    loss: float) -> tuple[float, bool]:
    """Clip and step unless the loss or gradient is non-finite; returns (grad norm, stepped)."""
    if is_deepspeed(accelerator):
        # The engine clips (gradient_clipping = --max_grad_norm), steps and zeroes the
        # gradients itself; only its fp16 loss scaler skips overflowing steps, so under bf16/fp32
        # a non-finite step is counted and --max_bad_steps stops the run, but not undone.
        model.step()
        norm = model.get_global_grad_norm()  # None where the engine did not compute one
        grad_norm = float("nan") if norm is None else float(norm)
        return grad_norm, math.isfinite(loss) and (norm is None or math.isfinite(grad_norm))
    grad_norm = _clip(accelerator, model, cfg.max_grad_norm)
    # Under fp16 the grad scaler skips overflowing steps itself; those are not bad steps.
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or cfg.mixed_precision == "fp16")
    if finite:
        optimizer.step()
    # else skip the update: one bad batch must not poison the weights
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def _clip(accelerator, model, max_norm: float) -> float:
    if max_norm > 0:
        return float(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    norms = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0

