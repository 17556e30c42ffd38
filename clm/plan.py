"""The plan of a run, before it starts: model size, FLOPs and tokens per step, per-GPU memory for
the chosen backend, whether it fits, what would, and the time to --max_steps.

    python train_clm.py --config configs/gpt2_124m_owt.yaml --dry_run --dry_run_num_gpus 8
    python train_clm.py --config configs/gpt2_124m_owt.yaml --dry_run --model_preset gpt2-xl \\
        --dry_run_gpu_memory_gb 24 --deepspeed ds_configs/zero3.json --dry_run_num_gpus 8

Nothing is read, downloaded or written: the model is built on the meta device (shapes, no
storage) from the preset or a local config, and the vocabulary is read from a local tokenizer's
files (else GPT-2's 50257 is assumed). The data options are not checked either, so a plan can be
made where the data is not mounted (a login node, a laptop); the real run checks them first.

The figures are estimates for eager PyTorch, meant to tell 20 GiB from 60 GiB, not to the last
GiB: allocator fragmentation, CUDA context, NCCL buffers and kernels' workspaces come on top,
which is what the 10% margin is for. Where DeepSpeed is installed its own estimator of the model
states is printed beside ours. Human-readable lines first; the last line is one JSON object.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import model as models
from .config import DataConfig, ModelConfig, TrainingConfig, UsageError, first_line

GIB = 2**30
GPT2_VOCAB = 50257
DEFAULT_GPU = "NVIDIA H100 80GB HBM3"
DEFAULT_GPU_MEMORY_GIB = 80.0
MARGIN = 0.10  # of the GPU's memory, kept for the allocator, CUDA context and NCCL buffers
ZERO3_JSON, ZERO3_OFFLOAD_JSON = "ds_configs/zero3.json", "ds_configs/zero3_offload.json"


# --- the model, on the meta device

@dataclass(frozen=True)
class Shape:
    """What the memory and FLOPs figures need to know of the model."""

    name: str
    params: int
    non_embedding: int
    largest_layer: int      # parameters of the largest module (ZeRO-3/FSDP gather it whole)
    n_layer: int
    n_head: int
    hidden: int
    vocab: int
    positions: int
    flops_per_token: float
    vocab_note: str


def tokenizer_vocab(name: str | None) -> tuple[int, str]:
    """len(tokenizer) from a local tokenizer folder's files, without loading transformers'
    tokenizer; GPT-2's 50257 for a Hub name or none."""
    folder = Path(name) if name else None
    if folder is None or not folder.is_dir():
        return GPT2_VOCAB, f"GPT-2's {GPT2_VOCAB} tokens assumed" + \
            (f" for '{name}'" if name else " (no --tokenizer_name)")
    if (folder / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        n = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size(
            with_added_tokens=True)
        return n, f"{n} tokens in {folder / 'tokenizer.json'}"
    vocab = folder / "vocab.json"
    if vocab.is_file():  # a slow GPT-2 tokenizer: vocab.json (+ added_tokens.json)
        ids = set(json.loads(vocab.read_text()).values())
        added = folder / "added_tokens.json"
        if added.is_file():
            ids |= set(json.loads(added.read_text()).values())
        return len(ids), f"{len(ids)} tokens in {vocab}"
    raise UsageError(f"no tokenizer.json or vocab.json in {folder} (pass --tokenizer_name with "
                     "a tokenizer folder)")


def _local_config(name: str, option: str):
    from transformers import AutoConfig

    try:  # a folder, or a Hub name already in the local cache: no download either way
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception as e:
        first = first_line(e)
        raise UsageError(f"--dry_run needs {option} {name} locally (a folder or the Hub cache): "
                         f"{first} (download it first, or plan with --model_preset)") from None


def model_config(data_cfg: DataConfig, model_cfg: ModelConfig):
    """The config build_model would train, and how its vocabulary was found."""
    from transformers import GPT2Config

    if model_cfg.model_name_or_path:
        config = _local_config(model_cfg.model_name_or_path, "--model_name_or_path")
        return config, f"{config.vocab_size} in the model's config"
    vocab, note = tokenizer_vocab(data_cfg.tokenizer_name)
    padded = models.padded_vocab(vocab)
    note = f"{padded} ({note}, padded to a multiple of {models.VOCAB_MULTIPLE})"
    if model_cfg.config_name:
        config = _local_config(model_cfg.config_name, "--config_name")
        config.vocab_size = padded
        return config, note
    n_layer, n_head, n_embd, n_positions = models.PRESET_SHAPES[model_cfg.model_preset]
    return GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                      vocab_size=padded, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      activation_function=models.FAST_GELU), note


def meta_model(config):
    """The model with parameters on the meta device: shapes only, no memory, no init cost."""
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    with torch.device("meta"):
        if config.model_type == "gpt2":
            return GPT2LMHeadModel(config)
        return AutoModelForCausalLM.from_config(config)


def model_shape(data_cfg: DataConfig, model_cfg: ModelConfig) -> Shape:
    config, note = model_config(data_cfg, model_cfg)
    model = meta_model(config)
    c = model.config
    positions = getattr(c, "n_positions", None) or c.max_position_embeddings
    if data_cfg.block_size > positions:
        raise UsageError(f"--block_size {data_cfg.block_size} is above the model's {positions} "
                         f"positions (use --block_size {positions} or less)")
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    name = model_cfg.model_name_or_path or model_cfg.config_name or model_cfg.model_preset
    return Shape(name=name, params=models.num_params(model),
                 non_embedding=models.num_params(model, non_embedding=True),
                 largest_layer=largest,
                 n_layer=getattr(c, "n_layer", None) or c.num_hidden_layers,
                 n_head=getattr(c, "n_head", None) or c.num_attention_heads,
                 hidden=getattr(c, "n_embd", None) or c.hidden_size, vocab=c.vocab_size,
                 positions=positions,
                 flops_per_token=models.flops_per_token(model, data_cfg.block_size),
                 vocab_note=note)


# --- how the run is set up

@dataclass(frozen=True)
class Setup:
    """The choices that decide memory per GPU. `shard`: 0 none (DDP), 1 optimizer states,
    2 also gradients, 3 also weights (ZeRO stages; FSDP full_shard is 3)."""

    backend: str                  # "ddp", "deepspeed" or "fsdp"
    shard: int
    offload_optimizer: bool
    offload_params: bool
    precision: str                # "no", "bf16" or "fp16"
    micro_batch: int
    accumulation: int
    checkpointing: bool
    num_gpus: int
    block_size: int
    eager_attention: bool

    @property
    def half(self) -> bool:
        return self.precision in ("bf16", "fp16")

    def describe(self) -> str:
        if self.backend == "deepspeed":
            what = f"DeepSpeed ZeRO-{self.shard}"
        elif self.backend == "fsdp":
            what = {3: "FSDP full_shard", 2: "FSDP shard_grad_op"}.get(self.shard, "FSDP no_shard")
        else:
            what = "DDP" if self.num_gpus > 1 else "one process (no DDP)"
        offload = [k for k, on in (("optimizer", self.offload_optimizer),
                                   ("weights", self.offload_params)) if on]
        if offload:
            what += f" (offload to host: {' and '.join(offload)})"
        prec = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[self.precision]
        if self.half and self.backend != "deepspeed":
            prec += " autocast"
        ckpt = "with" if self.checkpointing else "no"
        return f"{what}, {prec}, {ckpt} gradient checkpointing"


def _offloads(zero: dict) -> tuple[bool, bool]:
    device = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa
    return device("offload_optimizer"), device("offload_param")


def setup_of(train_cfg: TrainingConfig, block_size: int, num_gpus: int,
             eager_attention: bool) -> Setup:
    """The backend the run would use: --deepspeed (or accelerate's DeepSpeed config), --fsdp
    where this version has it, else DDP."""
    from . import runtime

    common = dict(precision=runtime.resolve_mixed_precision(train_cfg.mixed_precision),
                  micro_batch=train_cfg.per_device_train_batch_size,
                  accumulation=train_cfg.gradient_accumulation_steps,
                  checkpointing=train_cfg.gradient_checkpointing, num_gpus=num_gpus,
                  block_size=block_size, eager_attention=eager_attention)
    ds_file = runtime.deepspeed_config_file(train_cfg)
    if ds_file:  # checked as the run would check it (contradictions are errors here too)
        zero = runtime.deepspeed_config(ds_file, train_cfg, num_gpus).get("zero_optimization", {})
        optimizer, params = _offloads(zero)
        return Setup("deepspeed", int(zero.get("stage", 0)), optimizer,
                     params and int(zero.get("stage", 0)) == 3, **common)
    if train_cfg.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return Setup("fsdp", 3, False, False, **common)  # full_shard, the one mode supported
    return Setup("ddp", 0, False, False, **common)


# --- memory

def memory_bytes(shape: Shape, s: Setup) -> dict:
    """Per-GPU bytes at the peak of a step (the start of the backward pass), by kind, plus what
    offloading keeps on the host."""
    p, n = shape.params, s.num_gpus
    part = lambda stage: n if s.shard >= stage else 1  # noqa: E731 (divisor of a sharded kind)
    if s.backend == "deepspeed" and s.half:
        # DeepSpeed trains a 16-bit model: 2 bytes of weights and of gradients per parameter;
        # the optimizer holds fp32 master weights and AdamW's two fp32 states (12 bytes), and
        # casts its shard of the gradients to fp32 for the step (4 bytes). Replicated or sharded
        # by stage: 1 the optimizer, 2 also the gradients, 3 also the weights.
        weights, grads = 2 * p / part(3), 2 * p / part(2)
        optimizer, fp32_grads = 12 * p / part(1), 4 * p / part(1)
    else:
        # fp32 weights and gradients (DDP or FSDP, autocast or not; DeepSpeed in fp32) and
        # AdamW's two fp32 states, no master copy needed.
        weights, grads, optimizer, fp32_grads = 4 * p / part(3), 4 * p / part(2), \
            8 * p / part(1), 0.0
        if s.half and s.shard < 3:
            # autocast's 16-bit copy of every weight, cached through the forward pass and kept
            # by autograd for the backward
            weights += 2 * p
        if s.backend == "ddp" and n > 1:
            # DDP's reducer keeps its own flat buckets of the gradients (Accelerate's default
            # gradient_as_bucket_view=False): another copy of them
            grads += 4 * p
    if s.shard == 3:
        # the largest module gathered whole, weights and gradients, in the compute dtype
        weights += 2 * shape.largest_layer * (2 if s.half else 4)
    host = 0.0
    if s.offload_optimizer:
        host += optimizer + fp32_grads
        optimizer, fp32_grads = 0.0, 0.0
    if s.offload_params:
        gathered = 2 * shape.largest_layer * (2 if s.half else 4)
        host += weights - gathered
        weights = gathered
    layers, logits = activation_bytes(shape, s)
    total = weights + grads + fp32_grads + optimizer + layers + logits
    return {"weights": weights, "gradients": grads + fp32_grads, "optimizer": optimizer,
            "activations": layers + logits, "logits": logits, "total": total, "host": host}


def activation_bytes(shape: Shape, s: Setup) -> tuple[float, float]:
    """Activations kept for the backward pass of one micro-batch: (transformer layers, logits).

    Per layer, without recomputation, Korthikanti et al. 2022 ("Reducing Activation
    Recomputation in Large Transformer Models", Table 2, no parallelism) count
        b * s * h * (34 + 5 * a * s / h)  bytes in 16-bit
    (b micro-batch, s block size, h hidden size, a heads). The 5as/h term is the attention
    score matrix, its softmax and dropout mask: only eager attention keeps them (an upper bound
    without dropout), SDPA's fused kernels keep the output and a log-sum-exp. fp32 activations
    (no mixed precision) double it; on CPU in fp32 this is within 20% of the bytes autograd
    saves for a GPT-2 forward (tests/test_plan.py).
    With --gradient_checkpointing each layer keeps only its input, b * s * h values in the
    residual stream's dtype (fp32 under autocast, 16-bit under DeepSpeed), and one layer's full
    set exists at a time while it is recomputed.

    Logits: b * s * vocab values in the compute dtype, and their gradient of the same size.
    In fp32 cross-entropy also keeps the log-softmax (another 4 bytes each); under bf16/fp16
    the loss upcasts chunks of at most clm.loop.LOSS_CHUNK_ELEMENTS logits at a time (about
    three fp32 copies of one chunk: upcast, log-softmax, gradient).
    """
    b, t, h, a = s.micro_batch, s.block_size, shape.hidden, shape.n_head
    per_layer = b * t * h * (34 + (5 * a * t / h if s.eager_attention else 0))
    if not s.half:
        per_layer *= 2
    if s.checkpointing:
        residual = 2 if (s.half and s.backend == "deepspeed") else 4
        layers = shape.n_layer * b * t * h * residual + per_layer
    else:
        layers = shape.n_layer * per_layer
    values = b * t * shape.vocab
    if s.half:
        from . import loop

        chunk = min(values, getattr(loop, "LOSS_CHUNK_ELEMENTS", 2**26))
        logits = 2 * values * 2 + 3 * 4 * chunk
    else:
        logits = 3 * 4 * values
    return float(layers), float(logits)


def deepspeed_estimate(shape: Shape, s: Setup) -> float | None:
    """DeepSpeed's own estimate of the model states per GPU (bytes), where it has one for this
    stage (2 and 3; stage 1 has none) and deepspeed is installed."""
    if s.backend != "deepspeed" or s.shard not in (2, 3) or not s.half:
        return None
    try:
        if s.shard == 3:
            from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

            _, gpu, _ = estimate_zero3_model_states_mem_needs(
                shape.params, shape.largest_layer, num_gpus_per_node=s.num_gpus,
                cpu_offload=s.offload_optimizer, cpu_offload_params=s.offload_params)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import \
                estimate_zero2_model_states_mem_needs

            _, gpu = estimate_zero2_model_states_mem_needs(
                shape.params, num_gpus_per_node=s.num_gpus, cpu_offload=s.offload_optimizer)
    except Exception:  # not installed, or it cannot start here: the cross-check is optional
        return None
    return float(gpu)


# --- what would fit

def _fits(total: float, gpu_gib: float) -> bool:
    return total <= (1 - MARGIN) * gpu_gib * GIB


def variants(s: Setup) -> list[tuple[str, str, Setup, float]]:
    """Changes that lower memory at the same tokens per step: (what, options, setup, cost).
    The cost orders them by what they take from throughput or simplicity."""
    out = []
    micro, accum, k = s.micro_batch, s.accumulation, 0
    while micro % 2 == 0:
        micro, accum, k = micro // 2, accum * 2, k + 1
        out.append((f"micro-batch {micro} x accumulation {accum}",
                    f"--per_device_train_batch_size {micro} --gradient_accumulation_steps "
                    f"{accum}", dict(micro_batch=micro, accumulation=accum), float(k)))
    if s.num_gpus > 1 and s.shard < 3:
        out.append(("DeepSpeed ZeRO-3", f"--deepspeed {ZERO3_JSON}",
                    dict(backend="deepspeed", shard=3, offload_optimizer=False,
                         offload_params=False), 1.5))
        out.append(("FSDP full_shard", "--fsdp full_shard",
                    dict(backend="fsdp", shard=3, offload_optimizer=False,
                         offload_params=False), 1.6))
    if not s.checkpointing:
        out.append(("gradient checkpointing", "--gradient_checkpointing",
                    dict(checkpointing=True), 2.0))
    if not (s.offload_optimizer and s.offload_params):
        out.append(("DeepSpeed ZeRO-3 with offload to host", f"--deepspeed {ZERO3_OFFLOAD_JSON}",
                    dict(backend="deepspeed", shard=3, offload_optimizer=True,
                         offload_params=True), 5.0))
    return [(what, args, replace(s, **change), cost) for what, args, change, cost in out]


def suggestions(shape: Shape, s: Setup, gpu_gib: float) -> list[dict]:
    """Each single change with its recomputed total, then (if none of them fits alone) the
    cheapest combination that fits: one backend change, one micro-batch size, checkpointing."""
    singles = variants(s)

    def entry(what, args, setup, cost):
        total = memory_bytes(shape, setup)["total"]
        return {"change": what, "args": args, "memory_gib": round(total / GIB, 3),
                "fits": _fits(total, gpu_gib), "cost": cost}

    out = [entry(*v) for v in singles]
    if any(e["fits"] for e in out):
        return out
    micro = [v for v in singles if v[0].startswith("micro-batch")]
    backends = [v for v in singles if "ZeRO" in v[0] or "FSDP" in v[0]]
    ckpt = [v for v in singles if v[0] == "gradient checkpointing"]
    best = None
    for b in [None] + backends:
        for m in [None] + micro:
            for c in [None] + ckpt:
                parts = [v for v in (b, m, c) if v is not None]
                if len(parts) < 2:
                    continue
                change = {}
                for _, _, setup, _ in parts:
                    change.update({k: getattr(setup, k) for k in Setup.__dataclass_fields__
                                   if getattr(setup, k) != getattr(s, k)})
                setup, cost = replace(s, **change), sum(v[3] for v in parts)
                if _fits(memory_bytes(shape, setup)["total"], gpu_gib) and \
                        (best is None or cost < best[3]):
                    best = (" + ".join(v[0] for v in parts), " ".join(v[1] for v in parts),
                            setup, cost)
    if best:
        out.append(entry(*best))
    return out


# --- the plan

def local_gpu() -> tuple[str | None, float | None]:
    if not torch.cuda.is_available():
        return None, None
    return torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory / GIB


def make_plan(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig) -> dict:
    """Every figure of the plan, as the JSON line prints them."""
    name, memory = local_gpu()
    gpu = train_cfg.dry_run_gpu or (name if name in models.PEAK_FLOPS else DEFAULT_GPU)
    gpu_gib = train_cfg.dry_run_gpu_memory_gb or memory or DEFAULT_GPU_MEMORY_GIB
    num_gpus = train_cfg.dry_run_num_gpus or int(os.environ.get("WORLD_SIZE", "1"))
    shape = model_shape(data_cfg, model_cfg)
    s = setup_of(train_cfg, data_cfg.block_size, num_gpus,
                 model_cfg.attn_implementation == "eager")
    mem = memory_bytes(shape, s)
    tokens_per_step = s.micro_batch * s.accumulation * num_gpus * data_cfg.block_size
    peak = models.PEAK_FLOPS[gpu]
    seconds = train_cfg.max_steps * tokens_per_step * shape.flops_per_token / (
        num_gpus * peak * train_cfg.dry_run_mfu)
    fits = _fits(mem["total"], gpu_gib)
    ds = deepspeed_estimate(shape, s)
    gib = lambda x: round(x / GIB, 3)  # noqa: E731
    return {
        "model": shape.name, "params": shape.params, "non_embedding_params": shape.non_embedding,
        "vocab_size": shape.vocab, "vocab_note": shape.vocab_note,
        "n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.hidden,
        "flops_per_token": shape.flops_per_token,
        "block_size": data_cfg.block_size, "micro_batch": s.micro_batch,
        "gradient_accumulation_steps": s.accumulation, "num_gpus": num_gpus,
        "tokens_per_step": tokens_per_step,
        "backend": s.describe(), "mixed_precision": s.precision,
        "gradient_checkpointing": s.checkpointing,
        "memory_gib": {k: gib(mem[k]) for k in ("weights", "gradients", "optimizer",
                                                "activations", "logits", "total")},
        "host_gib_per_gpu": gib(mem["host"]),
        "deepspeed_estimate_gib": None if ds is None else gib(ds),
        "gpu": gpu, "gpu_memory_gib": round(float(gpu_gib), 3), "margin": MARGIN, "fits": fits,
        "suggestions": [] if fits else suggestions(shape, s, gpu_gib),
        "max_steps": train_cfg.max_steps, "mfu": train_cfg.dry_run_mfu,
        "peak_flops": peak, "hours_to_max_steps": round(seconds / 3600, 3),
    }


def _gpus(n: int) -> str:
    return f"{n} GPU" + ("s" if n > 1 else "")


def _m(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def format_plan(plan: dict) -> list[str]:
    m = plan["memory_gib"]
    lines = [
        f"plan for {plan['model']} (built on the meta device: nothing allocated, nothing read)",
        f"  parameters        {_m(plan['params'])} ({_m(plan['non_embedding_params'])} without "
        f"embeddings); {plan['n_layer']} layers, {plan['n_head']} heads, {plan['n_embd']} wide; "
        f"vocab {plan['vocab_note']}",
        f"  FLOPs per token   {plan['flops_per_token'] / 1e9:.3f} GFLOP (forward + backward, "
        f"at block size {plan['block_size']})",
        f"  tokens per step   {plan['tokens_per_step']:,} = {plan['micro_batch']} micro-batch x "
        f"{plan['gradient_accumulation_steps']} accumulation x {_gpus(plan['num_gpus'])} x "
        f"{plan['block_size']} tokens",
        f"  backend           {plan['backend']}",
        f"  memory per GPU    weights {m['weights']:.2f} + gradients {m['gradients']:.2f} + "
        f"optimizer {m['optimizer']:.2f} + activations {m['activations']:.2f} (logits "
        f"{m['logits']:.2f}) = {m['total']:.2f} GiB",
    ]
    if plan["host_gib_per_gpu"]:
        lines.append(f"  offloaded         {plan['host_gib_per_gpu']:.2f} GiB per GPU in host "
                     "memory")
    if plan["deepspeed_estimate_gib"] is not None:
        ours = m["weights"] + m["gradients"] + m["optimizer"]
        lines.append(f"  DeepSpeed says    {plan['deepspeed_estimate_gib']:.2f} GiB for weights, "
                     f"gradients and optimizer states (ours: {ours:.2f})")
    budget = (1 - plan["margin"]) * plan["gpu_memory_gib"]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"  {verdict:<17} {m['total']:.2f} GiB of {budget:.2f} usable ({plan['gpu']}, "
                 f"{plan['gpu_memory_gib']:.2f} GiB less {plan['margin']:.0%} for the allocator "
                 "and CUDA context)")
    for e in plan["suggestions"]:
        lines.append(f"    {'fits' if e['fits'] else 'no  '}  {e['memory_gib']:7.2f} GiB  "
                     f"{e['change']}: {e['args']}")
    if not plan["fits"] and not any(e["fits"] for e in plan["suggestions"]):
        lines.append("    nothing tried fits: more GPUs (--dry_run_num_gpus), a shorter "
                     "--block_size or a smaller model")
    lines.append(f"  time to max_steps {plan['hours_to_max_steps']:.2f} h for "
                 f"{plan['max_steps']:,} "
                 f"steps at {plan['mfu']:.0%} MFU of {plan['num_gpus']} x "
                 f"{plan['peak_flops'] / 1e12:.0f} TFLOP/s (bf16 peak; recomputation not counted)")
    return lines


def print_plan(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig) -> dict:
    """Print the plan (once, on rank 0 of a launch) and return it."""
    plan = make_plan(data_cfg, model_cfg, train_cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(format_plan(plan)))
        print(json.dumps(plan), flush=True)
    return plan
