"""The one training loop, shared by pretraining (train_clm.py) and finetuning (run_sft.py).

    python train_clm.py --config configs/demo_cpu.yaml

A batch is `input_ids`, `attention_mask`, `labels` (-100 where there is no loss). Each optimizer
step draws `gradient_accumulation_steps` micro-batches, counts their label tokens on every rank,
and scales each micro-batch's summed NLL by world_size / (global label tokens): after DDP's or
ZeRO's average over ranks the gradient is exactly that of the mean loss over every label token
of the step, however the step is split into micro-batches and ranks. The learning rate is a
function of the optimizer step (clm/optim.py: warmup then cosine to min_lr, times each param
group's scale), set on the optimizer directly, so no scheduler object steps once per process
behind our back. Under DeepSpeed the engine is given
the same normalised loss and does the clipping and the step.
"""

from __future__ import annotations

import collections
import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import faults, optim
from .attention import causal_rows, sdpa_backends
from .config import TrainingConfig
from .errors import TrainingError
from .parallel import Backend
from .parallel.base import StepResult
from .parallel.launch import all_reduce_sum
from .watchdog import Watchdog


@dataclass
class LoopState:
    """The loop's counters; with the model, optimizer and data state they define a run."""

    step: int = 0          # optimizer steps taken
    tokens: int = 0        # input tokens consumed, all ranks
    bad_steps: int = 0     # consecutive skipped (non-finite) steps
    skipped: int = 0       # skipped steps in total
    elapsed_s: float = 0.0


def prepare_batch(batch: dict, device) -> tuple[dict, int, int]:
    """Shift the labels and count tokens on the host, then copy to `device` without waiting.

    Returns (batch for `token_nll`, label tokens, input tokens). Shifting the labels (position
    t holds token t+1, the last is -100) lets the loss read the logits as they are, with no
    shifted copy of the largest tensor of the step; counting on the host costs no device sync.
    A mask with no padding is dropped: the model then takes its causal fast path. Packed rows
    (`position_ids` restarting at each example) are kept apart by their position ids, and their
    mask only counts the tokens.
    """
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    mask = batch["attention_mask"]
    n_labels, n_tokens = int((labels != -100).sum()), int(mask.sum())
    out = {"input_ids": batch["input_ids"], "labels": labels}
    if "position_ids" in batch:
        out["position_ids"] = batch["position_ids"]
    elif n_tokens != mask.numel():
        out["attention_mask"] = mask
    return {k: to_device(v, device) for k, v in out.items()}, n_labels, n_tokens


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` (on the host) copied to `device` without the host waiting. On CUDA a copy from
    pageable memory waits for the device to finish the work queued before it; from pinned
    memory it is queued behind that work instead."""
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def nll_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None):
    """Summed NLL of `logits` [N, V] against `labels` [N] (-100: no loss), computed in fp32.

    fp32 logits go to cross-entropy as they are. Lower-precision logits (bf16/fp16 autocast)
    are upcast `chunk_rows` rows at a time, each chunk recomputed in the backward pass, so fp32
    logits of the whole micro-batch (4 bytes x tokens x vocabulary) never exist at once.
    """
    if chunk_rows is None:
        chunk_rows = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
    if logits.dtype == torch.float32 or logits.shape[0] <= chunk_rows:
        return _chunk_nll_fn(logits, labels)
    from torch.utils.checkpoint import checkpoint

    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for rows, targets in zip(logits.split(chunk_rows), labels.split(chunk_rows)):
        total = total + checkpoint(_chunk_nll_fn, rows, targets, use_reentrant=False)
    return total


LOSS_CHUNK_ELEMENTS = 2**26  # 256 MiB of fp32 logits per chunk


def _chunk_nll(rows, targets):
    return F.cross_entropy(rows.float(), targets, ignore_index=-100, reduction="sum")


_chunk_nll_fn = _chunk_nll


def compile_loss(enabled: bool) -> None:
    """Under `--torch_compile`, compile the cross-entropy too (set at the start of every run).

    Compiling the model alone gains nothing on CPU: the step's largest work outside the
    matmuls is the log-softmax over the vocabulary and its backward, in the loss. Compiled,
    they fuse into a few passes over the logits (bench/train_throughput.py, tiny preset on 2
    cores: fwd+bwd 245 ms eager, 245 ms with the model compiled, ~200 ms with the loss too).
    """
    global _chunk_nll_fn
    _chunk_nll_fn = _compiled_chunk_nll() if enabled else _chunk_nll


@functools.cache
def _compiled_chunk_nll():
    return torch.compile(_chunk_nll)


def token_nll(model, batch: dict) -> torch.Tensor:
    """Summed next-token NLL of a `prepare_batch` batch (labels already shifted).

    Rows with neither a mask nor position ids (packed pretraining blocks) are plain causal
    rows: no mask is built, and SDPA takes its `is_causal` path (clm/attention.py), which is
    what the flash-only restriction of `attention.sdpa_backends` relies on."""
    extra = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    plain = is_plain(batch)
    with sdpa_backends(masked=not plain), causal_rows(model, plain):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       use_cache=False, **extra).logits
    return nll_sum(logits.flatten(0, 1), batch["labels"].flatten())


def is_plain(batch: dict) -> bool:
    """Whether a `prepare_batch` batch is plain causal rows (no padding, no packed examples)."""
    return "attention_mask" not in batch and "position_ids" not in batch


def forward_backward(model, micro_batches, backend: Backend, stop: bool = False) -> torch.Tensor:
    """One optimizer step's gradients. Returns one device tensor, summed over all ranks:
    [NLL of every label token, label tokens, input tokens, ranks asking to stop (`stop` is
    this rank's wish)]. Nothing here waits for the device: the caller reads it, with the
    gradient norm, in the one host sync of the step (`clip_and_step`)."""
    device, topology = backend.device, backend.topology
    prepared = [prepare_batch(b, device) for b in micro_batches]
    counts = torch.tensor([sum(p[1] for p in prepared), sum(p[2] for p in prepared), stop],
                          dtype=torch.float64)
    # the global label count stays on the device: the scale needs no sync
    counts = all_reduce_sum(to_device(counts, device), topology)
    # DDP and ZeRO average the gradients over the data-parallel ranks
    scale = topology.dp_world_size / counts[0].clamp(min=1)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, (batch, _, _) in enumerate(prepared):
        # the backward too: activation checkpointing runs the blocks' forward again in it
        with backend.micro_batch(model, last=i == len(prepared) - 1), \
                causal_rows(model, is_plain(batch)):
            nll = token_nll(model, batch)
            backend.backward(model, nll * scale)
        total += nll.detach().double()
    return torch.cat([all_reduce_sum(total, topology).view(1), counts])


@torch.no_grad()
def evaluate(model, heldout, batch_size: int, backend: Backend) -> float | None:
    """Token-weighted mean NLL over the held-out set, each rank taking its share, summed.

    `heldout` is a tensor of packed blocks (pretraining) or a list of batches (finetuning).
    """
    if heldout is None:
        return None
    accelerator, topology = backend.accelerator, backend.topology
    rank, world = topology.dp_rank, topology.dp_world_size
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
        batch, labels, _ = prepare_batch(mine[i] if counted else filler, accelerator.device)
        with accelerator.autocast():
            nll = token_nll(model, batch).double()
        if counted:
            sums[0] += nll
            sums[1] += labels
    model.train()
    total, count = all_reduce_sum(sums, topology).tolist()
    return total / count


def _block_batch(blocks: torch.Tensor) -> dict:
    return {"input_ids": blocks, "attention_mask": torch.ones_like(blocks), "labels": blocks}


@dataclass
class Hooks:
    """What the loop calls out to (the session provides them).

    `logger` takes the training and evaluation records (metrics.MetricsLogger);
    `evaluate()` returns {"eval_loss": .., "eval_<metric>": ..} (every `eval_steps` and at the
    end); `save(state)` checkpoints (every `save_steps`, and when stopped); `stop.local()`,
    this rank's wish to stop (runtime.StopRequest), is summed over the ranks with the step's
    token counts and acted on after that step (`stop.observe`), on every rank alike;
    `watchdog` (clm.watchdog) is told the phase of each step and when one is done.
    """

    logger: object
    evaluate: Callable[[], dict]
    save: Optional[Callable[[LoopState], None]] = None
    stop: object = None
    watchdog: Optional[Watchdog] = None


def train(cfg: TrainingConfig, backend: Backend, model, optimizer, batches, state: LoopState,
          hooks: Hooks) -> LoopState:
    """Run optimizer steps until `cfg.max_steps` or a stop request; `batches` never ends."""
    logger, evaluate_fn, save_fn, stop = hooks.logger, hooks.evaluate, hooks.save, hooks.stop
    watch = hooks.watchdog or Watchdog.off()
    model.train()
    data = iter(batches)
    try:
        window, spikes = _Window(), SpikeWatch(cfg.loss_spike_factor)
        run_start = time.perf_counter() - state.elapsed_s
        while state.step < cfg.max_steps:
            step = state.step + 1
            lr = optim.apply_schedule(optimizer, state.step, cfg)  # each group: x its lr_scale
            watch.phase("reading data", step)
            faults.at("data", step)
            wait = time.perf_counter()
            micro = [next(data) for _ in range(cfg.gradient_accumulation_steps)]
            window.data_s += time.perf_counter() - wait
            watch.phase("in forward/backward", step)
            sums = forward_backward(model, micro, backend, stop is not None and stop.local())
            watch.phase("in the optimizer step", step)
            nll, labels, tokens, grad_norm, finite, stopping = _optimizer_step(
                backend, model, optimizer, cfg, sums)
            watch.beat()
            state.bad_steps = 0 if finite else state.bad_steps + 1
            state.skipped += not finite
            state.step = step
            state.tokens += tokens
            state.elapsed_s = time.perf_counter() - run_start
            window.add(nll, labels, tokens, finite)
            if finite and labels:
                spike = spikes.check(nll / labels)
                if spike:
                    logger.log_event(state.step, state.tokens, spike)
            logger.advance()
            if not finite or state.step % cfg.logging_steps == 0 or state.step == cfg.max_steps:
                logger.log_train(window.record(state, lr, grad_norm, backend))
                window = _Window()
            if state.bad_steps >= cfg.max_bad_steps:
                raise TrainingError(
                    f"{state.bad_steps} optimizer steps in a row had a non-finite loss or "
                    f"gradient, the last at step {state.step} (lower --learning_rate, keep "
                    "--max_grad_norm clipping on, or check the data)")
            if (cfg.eval_steps and state.step % cfg.eval_steps == 0) or state.step == cfg.max_steps:
                watch.phase("evaluating", step)
                results = evaluate_fn()
                if results:
                    logger.log_eval(state.step, state.tokens, results)
            saved = bool(save_fn and cfg.save_steps and state.step % cfg.save_steps == 0)
            stopping = stop is not None and stop.observe(stopping)
            if saved or (stopping and save_fn):
                watch.phase("saving a checkpoint", step)
                save_fn(state)
            faults.at("step", step)
            if stopping:
                break
    finally:  # on every way out, errors included: the DataLoader workers stop now
        watch.close()
        getattr(data, "close", lambda: None)()
    return state


class SpikeWatch:
    """Loss spikes: a step whose loss is over `factor` x the median of the last WINDOW steps'
    losses (once MIN_SEEN are known) is an event. It only reports: the step has been taken.
    The losses are the step's, summed over the ranks, so every rank sees the same spikes."""

    WINDOW, MIN_SEEN = 50, 10

    def __init__(self, factor: float):
        self.factor, self.recent = factor, collections.deque(maxlen=self.WINDOW)

    def check(self, loss: float) -> dict | None:
        """The event for this step's `loss`, or None."""
        median = statistics.median(self.recent) if len(self.recent) >= self.MIN_SEEN else None
        self.recent.append(loss)
        if not self.factor or median is None or not loss > self.factor * median:
            return None
        return {"event": "loss_spike", "step_loss": loss, "median_loss": median,
                "ratio": round(loss / median, 3), "window": len(self.recent) - 1}


class _Window:
    """The steps since the last log line: the logged loss is their token-weighted mean, as the
    HF Trainer logs it, so a curve drawn every N steps is not one noisy step in N."""

    def __init__(self):
        self.nll = self.labels = self.tokens = self.skipped = 0
        self.data_s, self.start = 0.0, time.perf_counter()

    def add(self, nll: float, labels: int, tokens: int, finite: bool) -> None:
        self.tokens += tokens
        if finite:
            self.nll, self.labels = self.nll + nll, self.labels + labels
        else:
            self.skipped += 1

    def record(self, state: LoopState, lr: float, grad_norm: float, backend: Backend) -> dict:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        tps = self.tokens / seconds
        record = {"step": state.step, "tokens": state.tokens,
                  "loss": self.nll / self.labels if self.labels else None, "lr": lr,
                  "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
                  "tokens_per_sec": round(tps, 1), "elapsed_s": round(state.elapsed_s, 3),
                  # share of the time the loop waited for the DataLoader
                  "data_wait": round(self.data_s / seconds, 4)}
        if backend.device.type == "cuda":  # this rank's peak, since the start
            record["max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        if self.skipped:
            record["skipped"] = self.skipped
        return record


def _optimizer_step(backend: Backend, model, optimizer, cfg: TrainingConfig,
                    sums) -> StepResult:
    """Clip and step unless the loss or gradient is non-finite (the backend's way).

    Takes forward_backward's device tensor and reads it, with the gradient norm, in the one
    host sync of the step.
    """
    return backend.clip_and_step(model, optimizer, cfg.max_grad_norm,
                                 cfg.mixed_precision == "fp16", sums)
