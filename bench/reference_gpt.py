"""The outside reference: a minimal hand-written GPT-2, its plain loop, and a random-crop sampler.

    python bench/train_throughput.py --preset tiny            # times it beside train_clm.py's loop
    python bench/learning_efficiency.py                       # feeds random crops to our loop

This is what the ~300-line single-file trainers users compare us with do, written here so the
benchmarks can put our numbers next to theirs in the same run: GPT-2's architecture (learned
positions, pre-LayerNorm blocks with biases, tanh GELU, tied input/output embeddings, GPT-2
initialisation) with SDPA causal attention, AdamW on matrices with decay, the loss on targets
shifted by one, and a `while` loop with no framework around it. Nothing in `clm/` is imported,
so a slowdown or a learning defect there cannot hide in the reference too.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2 of the given shape; `forward(idx, targets)` returns the mean next-token loss."""

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, n_positions: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:  # GPT-2: N(0, 0.02), residual projections scaled by depth
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx, targets):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def lr_at(it: int, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    if it < warmup:
        return lr * (it + 1) / warmup
    ratio = min(1.0, (it - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


def plain_train(model: GPT, get_batch, steps: int, accum: int = 1, lr: float = 6e-4,
                min_lr: float = 6e-5, warmup: int = 0, weight_decay: float = 0.1,
                betas=(0.9, 0.95), clip: float = 1.0, warmup_steps_excluded: int = 0,
                autocast_dtype=None, fused: bool | None = None) -> dict:
    """nanoGPT's loop: accumulate, clip, AdamW step; returns timing of the steps after the first
    `warmup_steps_excluded` (compilation and allocator warm-up)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    device = params[0].device
    if fused is None:  # nanoGPT: fused AdamW where the parameters are on CUDA
        fused = device.type == "cuda"
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)
    ctx = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype \
        else (lambda: torch.autocast(device.type, enabled=False))
    tokens, losses, start = 0, [], None
    for it in range(steps):
        if it == warmup_steps_excluded:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, tokens = time.perf_counter(), 0
        for g in opt.param_groups:
            g["lr"] = lr_at(it, lr, min_lr, warmup, steps)
        total = 0.0
        for _ in range(accum):
            x, y = get_batch()
            with ctx():
                loss = model(x, y) / accum
            loss.backward()
            total += loss.detach()
            tokens += x.numel()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_sec": tokens / elapsed,
            "losses": [float(x) for x in losses]}


class RandomCrops:
    """nanoGPT's `get_batch`: sequences cut at uniformly random offsets of one flat token array.

    Iterating yields this project's batch format (labels = input_ids, shifted by the loop);
    calling it yields (x, y) pairs for `plain_train`. `state_dict` exists so the real loop's
    checkpointing could save it, though the benchmarks never checkpoint.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device="cpu"):
        self.tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.gen = torch.Generator().manual_seed(seed)

    def _crop(self, length: int) -> torch.Tensor:
        ix = torch.randint(len(self.tokens) - length + 1, (self.batch_size,), generator=self.gen)
        return torch.stack([self.tokens[i:i + length] for i in ix.tolist()])

    def __call__(self):
        xy = self._crop(self.block_size + 1).to(self.device)
        return xy[:, :-1], xy[:, 1:]

    def __iter__(self):
        while True:
            x = self._crop(self.block_size)
            yield {"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()}

    def state_dict(self) -> dict:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["generator"])
