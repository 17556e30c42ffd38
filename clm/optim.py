"""The optimizer as one component: parameter groups by role, the learning-rate schedule applied
per group, the fused-kernel choice, its state bytes for `--dry_run`, and what a resume must match.

    python train_clm.py --config configs/demo_cpu.yaml --optim muon --muon_lr_ratio 2

Every trainable parameter has one role, and the optimizer gets one param group per role that
the model has (Muon splits the hidden matrices further by layout, below):

    embeddings        token and position embeddings (GPT-2's head is tied to the token one)
    head              an untied output projection (--untie_word_embeddings)
    hidden_matrices   the transformer blocks' weight matrices
    norms_and_biases  LayerNorm weights and biases, and every bias

A group carries its role and an `lr_scale`; the loop sets each group's learning rate to the
schedule's value (`lr_at`: warmup, then --lr_scheduler_type, counted in optimizer steps) times
that scale (`apply_schedule`), so an optimizer that wants other rates for some roles says so in
its groups, not in the loop.

- adamw_torch / adamw_torch_fused (TrainingArguments' names): torch's AdamW on every group,
  decaying the matrices (embeddings, head, hidden) and not the norms and biases. adamw_torch
  takes the fused kernel where the backend allows it (as TrainingArguments' default does on
  torch >= 2.8); adamw_torch_fused asks for it, a one-line error where the backend cannot.
- muon: `MuonWithAdamW`, torch.optim.Muon's update (momentum, Newton-Schulz orthogonalisation,
  `adjust_lr_fn="match_rms_adamw"`) on the hidden matrices and AdamW on the rest, in one
  optimizer (one state_dict, one step, what Accelerate, checkpoints and FSDP2 expect). Matched
  to AdamW's update RMS (Moonlight), Muon's rate is --learning_rate x --muon_lr_ratio (or
  --muon_learning_rate) on the same schedule, and its weight decay --weight_decay. HF's
  `Conv1D` keeps its weight as (in, out), the transpose of `nn.Linear`'s: each matrix is
  orthogonalised in Linear's (out, in) layout, so the shape-based rate adjustment sees the
  layer's real fan-out and fan-in, and GPT-2's fused QKV matrix can be split into its three
  (--muon_split_qkv). Where a backend shards, each matrix is still
  orthogonalised whole: FSDP2's DTensors are gathered per matrix, and DeepSpeed ZeRO-1/2's
  flat partitions are read back into matrices by a `FlatLayout`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.optim._muon import (DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _adjust_lr,
                               _zeropower_via_newtonschulz)

from .config import OPTIM_CHOICES, TrainingConfig
from .errors import UsageError

ROLES = ("embeddings", "head", "hidden_matrices", "norms_and_biases")
# modules whose weight is three projections (query, key, value) stacked along the output
FUSED_QKV = ("c_attn", "qkv_proj", "query_key_value", "Wqkv")


class Optimizer(NamedTuple):
    state_bytes: int         # optimizer state per parameter AdamW updates (fp32 masters not counted)
    matrix_state_bytes: int  # ... per hidden-matrix parameter
    state: str               # what that state is, as --dry_run lists it
    fused: bool              # has a fused kernel (one launch over all parameters)


OPTIMIZERS = {
    "adamw_torch": Optimizer(8, 8, "AdamW's two fp32 moments", True),
    "adamw_torch_fused": Optimizer(8, 8, "AdamW's two fp32 moments", True),
    "muon": Optimizer(8, 4, "Muon's fp32 momentum on the block matrices, AdamW's two fp32 "
                      "moments on the rest", True),
}
assert set(OPTIMIZERS) == set(OPTIM_CHOICES), "config.OPTIM_CHOICES and OPTIMIZERS differ"


class StateSize(NamedTuple):
    """An optimizer's state for one model, as the planner's backends count it."""
    state_bytes: float  # mean bytes a parameter
    state: str


def state_size(name: str, params: int, hidden_matrices: int) -> StateSize:
    """`--optim name`'s state for a model of `params` parameters, `hidden_matrices` of them in
    the blocks' weight matrices (Muon keeps one buffer for those, AdamW two for the rest)."""
    opt = OPTIMIZERS[name]
    total = opt.matrix_state_bytes * hidden_matrices + opt.state_bytes * (params - hidden_matrices)
    return StateSize(total / max(1, params), opt.state)


def lr_at(step: int, cfg: TrainingConfig) -> float:
    """The schedule's learning rate of optimizer step `step` (0-based), a pure function of the
    step (so a resume is exact): linear warmup over --warmup_steps (step 0 already at
    1/warmup of the peak, not at 0), then --lr_scheduler_type up to --max_steps.

    warmup_stable_decay holds the peak until the last `num_decay_steps` (or `decay_ratio` x
    max_steps) steps and decays over them to --min_lr: a run extended from a checkpoint taken
    before its decay (a larger --max_steps) has the same rates up to that checkpoint.
    """
    peak, kind, kw = cfg.learning_rate, cfg.lr_scheduler_type, cfg.lr_scheduler_kwargs or {}
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if kind == "constant_with_warmup":
        return peak
    if kind == "warmup_stable_decay":
        decay = kw.get("num_decay_steps") or max(1, round(kw.get("decay_ratio", 0.2) *
                                                          cfg.max_steps))
        start = max(cfg.warmup_steps, cfg.max_steps - decay)
        if step < start:
            return peak
        progress = min(1.0, (step - start) / max(1, cfg.max_steps - start))
        shape = kw.get("decay_type", "linear")
        left = {"linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                "1-sqrt": 1 - math.sqrt(progress)}[shape]
        return cfg.min_lr + left * (peak - cfg.min_lr)
    floor = cfg.min_lr if kind == "cosine_with_min_lr" else 0.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    if kind == "linear":
        return peak * (1 - progress)
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (peak - floor)


def muon_momentum_at(step: int, cfg: TrainingConfig) -> float:
    """Muon's momentum at `step`: from 0.85 up to --muon_momentum over
    --muon_momentum_warmup_steps (modded-nanogpt's warmup), then constant."""
    if step >= cfg.muon_momentum_warmup_steps:
        return cfg.muon_momentum
    frac = step / cfg.muon_momentum_warmup_steps
    return (1 - frac) * min(0.85, cfg.muon_momentum) + frac * cfg.muon_momentum


def set_lr(optimizer, lr: float) -> None:
    """Each group's learning rate: the schedule's `lr` times the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def apply_schedule(optimizer, step: int, cfg: TrainingConfig) -> float:
    """Set step `step`'s learning rates (and Muon's momentum); returns the schedule's rate.
    Both are pure functions of the step and the run's options (Muon's lr_scale too, not the
    one a checkpoint's groups saved), so a resumed run sets what the first run did, and a
    changed --learning_rate moves Muon's rate as --muon_learning_rate or its ratio says."""
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        if group.get("muon"):
            group["lr_scale"] = cfg.muon_lr_scale()
            group["momentum"] = muon_momentum_at(step, cfg)
    set_lr(optimizer, lr)
    return lr


def roles(model) -> dict[str, list[torch.nn.Parameter]]:
    """The model's trainable parameters by role (in the model's order within each role); a
    parameter shared by two modules (a tied head) counts once, under the first."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = {id(output.weight)} if output is not None else set()
    out = {role: [] for role in ROLES}
    for param in model.parameters():  # each parameter once, tied ones included
        if not param.requires_grad:
            continue
        if param.dim() < 2:
            role = "norms_and_biases"
        elif id(param) in embeddings:
            role = "embeddings"
        elif id(param) in head:
            role = "head"
        else:
            role = "hidden_matrices"
        out[role].append(param)
    return out


def matrix_layouts(model, params, split_qkv: bool) -> dict[int, tuple[bool, int]]:
    """{id(param): (transposed, pieces)}: whether the weight is stored (in, out) as HF's
    `Conv1D` keeps it, and into how many matrices it splits along its output (3 for a fused
    QKV projection when `split_qkv`, else 1)."""
    from transformers.pytorch_utils import Conv1D

    wanted = {id(p) for p in params}
    out = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in wanted and id(p) not in out:
                fused = split_qkv and name.rsplit(".", 1)[-1] in FUSED_QKV
                out[id(p)] = (isinstance(module, Conv1D), 3 if fused else 1)
    return out


def param_groups(model, cfg: TrainingConfig) -> list[dict]:
    """One group per role the model has: its parameters, role, weight decay and lr_scale.
    Under Muon the hidden matrices are Muon's (`muon: True`), one group per (layout, pieces)."""
    groups = []
    for role, params in roles(model).items():
        if not params:
            continue
        decay = 0.0 if role == "norms_and_biases" else cfg.weight_decay
        if role != "hidden_matrices" or cfg.optim != "muon":
            groups.append({"params": params, "role": role, "weight_decay": decay,
                           "lr_scale": 1.0, "muon": False})
            continue
        layouts = matrix_layouts(model, params, cfg.muon_split_qkv)
        for layout in dict.fromkeys(layouts[id(p)] for p in params):
            groups.append({"params": [p for p in params if layouts[id(p)] == layout],
                           "role": role, "weight_decay": decay, "lr_scale": cfg.muon_lr_scale(),
                           "muon": True, "transposed": layout[0], "pieces": layout[1],
                           "momentum": cfg.muon_momentum, "nesterov": cfg.muon_nesterov,
                           "ns_steps": cfg.muon_ns_steps})
    return groups


def make_optimizer(model, cfg: TrainingConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The `--optim` optimizer over `model`'s trainable parameters, grouped by role.

    `fused`: whether the backend allows fused kernels on the device the parameters will live
    on (`Backend.fused_optimizer`; the optimizer is built before `prepare` moves them); used
    where the optimizer has one, required by adamw_torch_fused.
    """
    if cfg.optim == "adamw_torch_fused" and not fused:
        raise UsageError("--optim adamw_torch_fused: this backend cannot use the fused AdamW "
                         "kernel here (fp16 under FSDP's loss scaler, or a device without it); "
                         "use --optim adamw_torch")
    kind = MuonWithAdamW if cfg.optim == "muon" else torch.optim.AdamW
    return kind(param_groups(model, cfg), lr=cfg.learning_rate,
                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                fused=fused and OPTIMIZERS[cfg.optim].fused)


class MuonWithAdamW(torch.optim.AdamW):
    """torch.optim.Muon's update on the groups marked `muon`, torch.optim.AdamW's on the others,
    as one optimizer: one state (`momentum_buffer` for a Muon matrix, AdamW's moments and step
    for the rest), one state_dict, one step.

    A Muon group also holds `transposed` (the weight is stored (in, out), as HF's Conv1D keeps
    it), `pieces` (matrices stacked along the output, orthogonalised one by one), `momentum`,
    `nesterov` and `ns_steps`. A parameter sharded by FSDP2 (a DTensor) has its update gathered
    whole for the Newton-Schulz step, and each rank applies its own rows of the result.
    """

    ADJUST_LR = "match_rms_adamw"  # update RMS matched to AdamW's: its lr and decay carry over

    def __init__(self, params, **adamw):
        super().__init__(params, **adamw)
        # fp16: the GradScaler must unscale, check for inf/NaN and skip the whole step itself.
        # Fused AdamW would take the overflow flag and skip on its own, but Muon's half would
        # step on the bad gradients.
        self._step_supports_amp_scaling = False
        # id(flat fp32 partition) -> FlatLayout, set by the DeepSpeed backend after prepare
        self.flat_layouts: dict[int, FlatLayout] = {}

    def __setstate__(self, state):
        # Adam's own fix-ups expect AdamW's state ("step") on every parameter: show it the AdamW
        # groups only
        groups = state["param_groups"]
        super().__setstate__({**state, "param_groups": [g for g in groups if not g.get("muon")]})
        self.param_groups = groups

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        self.param_groups = [g for g in groups if not g.get("muon")]
        try:
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("muon"):
                for p in group["params"]:
                    if p.grad is not None:
                        self._muon_update(p, group)
        return loss

    def _muon_update(self, p, group) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, momentum = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - momentum)
        update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
        lr = group["lr"]
        flat = self.flat_layouts.get(id(p))
        if flat is not None:  # a ZeRO-1/2 partition: gather the group's matrices whole
            step = flat.step(update, lambda u, out: self._orthogonal_step(u, out, group, lr))
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(step)
            return
        if p.dim() < 2:
            raise RuntimeError("MuonWithAdamW got a flat parameter with no FlatLayout: a "
                               "backend flattened Muon's matrices without saying where they are")
        sharded = hasattr(update, "full_tensor")  # an FSDP2 DTensor
        if sharded:
            update = update.full_tensor()
        # the step to subtract, in the weight's own layout; for a DTensor a full-size buffer
        # of which each rank applies its own rows
        target = torch.zeros_like(update) if sharded else p
        p.mul_(1 - lr * group["weight_decay"])
        self._orthogonal_step(update, target, group, lr)
        if sharded:
            p.to_local().add_(_local_part(target, p))

    def _orthogonal_step(self, update, out, group, lr) -> None:
        """out -= Muon's step for the momentum update `update` of one weight (same shape):
        orthogonalised in nn.Linear's (out, in) layout, piece by piece, its rate adjusted to
        each piece's shape."""
        as_linear = (lambda t: t.T) if group["transposed"] else (lambda t: t)
        for target, piece in zip(as_linear(out).chunk(group["pieces"]),
                                 as_linear(update).chunk(group["pieces"])):
            ortho = _zeropower_via_newtonschulz(piece, (DEFAULT_A, DEFAULT_B, DEFAULT_C),
                                                group["ns_steps"], EPS)
            target.add_(ortho, alpha=-_adjust_lr(lr, self.ADJUST_LR, target.shape))


class FlatLayout(NamedTuple):
    """Where the matrices of one param group lie in the flat buffer that DeepSpeed's ZeRO-1/2
    partitions across ranks (each rank's optimizer sees only its `partition`-long slice)."""
    offsets: tuple[int, ...]           # each matrix's first element in the flat buffer
    shapes: tuple[torch.Size, ...]     # ... and its shape as stored
    partition: int                     # elements per rank
    rank: int                          # this rank's index in `group`
    world: int
    group: object                      # the process group the partitions are cut over

    def step(self, update: torch.Tensor, orthogonal_step) -> torch.Tensor:
        """This rank's slice of the Muon step for the whole group, from every rank's slice of
        the momentum update: `orthogonal_step(matrix_update, matrix_out)` runs on each matrix
        that overlaps this rank's slice, whole (Newton-Schulz needs the full matrix).

        The ranks' slices arrive one broadcast at a time, in order, and are dropped once no
        matrix left to do starts in them: at most one matrix's span of slices is held (not
        the whole group, as an all-gather would), for the same bytes on the wire."""
        size, lo = self.partition, self.rank * self.partition
        todo = [(o, o + s.numel(), s) for o, s in sorted(zip(self.offsets, self.shapes),
                                                         key=lambda t: t[0])
                if o < lo + size and o + s.numel() > lo]
        mine = torch.zeros_like(update)
        held: dict[int, torch.Tensor] = {}
        for r in range(self.world):
            piece = update.contiguous() if r == self.rank else update.new_empty(size)
            if self.world > 1:
                torch.distributed.broadcast(
                    piece, torch.distributed.get_global_rank(self.group, r), group=self.group)
            held[r] = piece
            while todo and todo[0][1] <= (r + 1) * size:
                offset, end, shape = todo.pop(0)
                first = offset // size
                # one slice is used as it is: no copy of a whole partition per matrix
                span = held[r] if first == r else torch.cat([held[q] for q in range(first, r + 1)])
                start = offset - first * size
                out = torch.zeros(shape, dtype=update.dtype, device=update.device)
                orthogonal_step(span[start:start + shape.numel()].view(shape), out)
                a, b = max(offset, lo), min(end, lo + size)
                mine[a - lo:b - lo] = out.view(-1)[a - offset:b - offset]
            keep = todo[0][0] // size if todo else self.world
            for q in [q for q in held if q < keep]:
                del held[q]
        return mine


def _local_part(full: torch.Tensor, dtensor) -> torch.Tensor:
    """This rank's shard of `full`, a tensor of `dtensor`'s global shape."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(
        dtensor.shape, dtensor.device_mesh, dtensor.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]
