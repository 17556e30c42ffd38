"""The optimizer as one component: parameter groups by role, the learning-rate schedule applied
per group, the fused-kernel choice, its state bytes for `--dry_run`, and what a resume must match.

    python train_clm.py --config configs/demo_cpu.yaml --optim adamw_torch --weight_decay 0.1

Every trainable parameter has one role, and the optimizer gets one param group per role that
the model has:

    embeddings        token and position embeddings (GPT-2's head is tied to the token one)
    head              an untied output projection
    hidden_matrices   the transformer blocks' weight matrices
    norms_and_biases  LayerNorm weights and biases, and every bias

A group carries its role and an `lr_scale`; the loop sets each group's learning rate to the
schedule's value (`lr_at`: warmup, then --lr_scheduler_type, counted in optimizer steps) times
that scale (`set_lr`), so an optimizer that wants other rates for some roles says so in its
groups, not in the loop. AdamW (`adamw_torch`, the name TrainingArguments' `optim` gives
torch's AdamW) decays the matrices (embeddings, head, hidden) and not the norms and biases, all
at scale 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .config import OPTIM_CHOICES, TrainingConfig

ROLES = ("embeddings", "head", "hidden_matrices", "norms_and_biases")


class Optimizer(NamedTuple):
    state_bytes: int    # optimizer state per trainable parameter (fp32 masters not counted)
    state: str          # what that state is, as --dry_run lists it
    fused: bool         # has a fused kernel (one launch over all parameters)


OPTIMIZERS = {"adamw_torch": Optimizer(8, "AdamW's two fp32 moments", True)}
assert set(OPTIMIZERS) == set(OPTIM_CHOICES), "config.OPTIM_CHOICES and OPTIMIZERS differ"


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


def set_lr(optimizer, lr: float) -> None:
    """Each group's learning rate: the schedule's `lr` times the group's `lr_scale`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


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


def param_groups(model, cfg: TrainingConfig) -> list[dict]:
    """One group per role the model has: its parameters, role, weight decay and lr_scale."""
    groups = []
    for role, params in roles(model).items():
        if params:
            decay = 0.0 if role == "norms_and_biases" else cfg.weight_decay
            groups.append({"params": params, "role": role, "weight_decay": decay,
                           "lr_scale": 1.0})
    return groups


def make_optimizer(model, cfg: TrainingConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The `--optim` optimizer over `model`'s trainable parameters, grouped by role.

    `fused`: whether the backend allows fused kernels on the device the parameters will live
    on (`Backend.fused_optimizer`; the optimizer is built before `prepare` moves them); used
    where the optimizer has one.
    """
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             fused=fused and OPTIMIZERS[cfg.optim].fused)
