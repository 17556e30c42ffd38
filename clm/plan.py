"""The plan of a run, before it starts: model size, FLOPs and tokens per step, per-GPU memory for
the chosen backend, whether it fits, what would, and the time to --max_steps.

    python train_clm.py --config configs/gpt2_124m_owt.yaml --dry_run --dry_run_num_gpus 8
    python train_clm.py --config configs/gpt2_124m_owt.yaml --dry_run --model_preset gpt2-xl \\
        --dry_run_gpu_memory_gb 24 --deepspeed ds_configs/zero3.json --dry_run_num_gpus 8

Nothing is read, downloaded or written: the model is built on the meta device (shapes, no
storage) from the preset or a local config (--model_name_or_path: its config only, never its
weights), and the vocabulary is read from a local tokenizer's files (else GPT-2's 50257 is
assumed). The data options are not checked either, so a plan can be made where the data is not
mounted (a login node, a laptop); the real run checks them first.

The figures are estimates for eager PyTorch, meant to tell 20 GiB from 60 GiB, not to the last
GiB: allocator fragmentation, CUDA context, NCCL buffers, communication buckets and kernels'
workspaces come on top, which is what the 10% margin is for. Memory is printed term by term
(memory_terms: what is alive at the start of a backward pass, where the step peaks). Where
DeepSpeed is installed its own estimator of the model states is printed beside ours.
Human-readable lines first; the last line is one JSON object.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from . import model as models, optim
from .config import DataConfig, ModelConfig, TrainingConfig
from .errors import UsageError, first_line
from .metrics import PEAK_FLOPS
from .parallel import BACKENDS
from .parallel.launch import Topology

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
    largest_layer: int      # parameters of the largest module (ZeRO-3 gathers one module at a time)
    n_layer: int
    n_head: int
    hidden: int
    vocab: int
    positions: int
    flops_per_token: float
    vocab_note: str
    # Each module's own parameters (indices into `numels`, one per distinct parameter, tied
    # ones once), in forward order: the trace ZeRO-3 fetches and releases parameters by.
    units: tuple = ()
    numels: tuple = ()
    # FSDP's shard groups: the largest transformer block, and what is outside every block
    # (embeddings, final norm, a tied head), which the root group keeps gathered.
    largest_block: int = 0
    root_params: int = 0
    checkpoint_dtype: str | None = None   # the dtype a --model_name_or_path config records
    hidden_matrices: int = 0    # parameters in the blocks' weight matrices (Muon's, under muon)


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
    if model_cfg.model_name_or_path:
        config = _local_config(model_cfg.model_name_or_path, "--model_name_or_path")
        return config, f"{config.vocab_size} in the model's config"
    vocab, note = tokenizer_vocab(data_cfg.tokenizer_name)
    padded = models.padded_vocab(vocab)
    note = f"{padded} ({note}, padded to a multiple of {models.VOCAB_MULTIPLE})"
    if model_cfg.config_name:
        config = _local_config(model_cfg.config_name, "--config_name")
        config.vocab_size = padded
    else:
        config = models.preset_config(model_cfg.model_preset, padded)
    models.head_options(config, model_cfg)
    return config, note


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
    models.check_block_size(model.config, data_cfg.block_size)
    name = model_cfg.model_name_or_path or model_cfg.config_name or model_cfg.model_preset
    dtype = getattr(config, "dtype", None) if model_cfg.model_name_or_path else None
    return shape_of(model, name, data_cfg.block_size, note,
                    str(dtype).replace("torch.", "") if dtype is not None else None)


def shape_of(model, name: str, block_size: int, vocab_note: str = "",
             checkpoint_dtype: str | None = None) -> Shape:
    """The Shape of a model (on the meta device or not: only shapes are read)."""
    from .parallel.base import transformer_blocks

    c = model.config
    index = {id(p): i for i, p in enumerate(model.parameters())}  # tied parameters once
    numels = tuple(p.numel() for p in model.parameters())
    units = tuple(u for u in (tuple(index[id(p)] for p in m.parameters(recurse=False))
                              for m in model.modules()) if u)
    try:
        blocks = transformer_blocks(model)
    except ValueError:  # no block class named: FSDP's figure falls back to the largest module
        blocks = []
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    return Shape(name=name, params=models.num_params(model),
                 non_embedding=models.num_params(model, non_embedding=True),
                 largest_layer=max(sum(numels[i] for i in u) for u in units),
                 n_layer=getattr(c, "n_layer", None) or c.num_hidden_layers,
                 n_head=getattr(c, "n_head", None) or c.num_attention_heads,
                 hidden=getattr(c, "n_embd", None) or c.hidden_size, vocab=c.vocab_size,
                 positions=getattr(c, "n_positions", None) or c.max_position_embeddings,
                 flops_per_token=models.flops_per_token(model, block_size),
                 vocab_note=vocab_note, units=units, numels=numels,
                 largest_block=max((sum(p.numel() for p in b.parameters()) for b in blocks),
                                   default=0),
                 root_params=sum(p.numel() for p in model.parameters()
                                 if id(p) not in in_blocks) if blocks else 0,
                 checkpoint_dtype=checkpoint_dtype,
                 hidden_matrices=sum(p.numel() for p in optim.roles(model)["hidden_matrices"]))


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
    # DeepSpeed: the JSON's data_types.grad_accum_dtype ("fp32", "bf16", "fp16"; None: the
    # model's dtype, DeepSpeed's default) and its ZeRO-3 knobs as (key, value) pairs
    grad_accum_dtype: str | None = None
    zero3: tuple = ()
    optim: str = "adamw_torch"    # --optim: its state bytes per parameter (clm/optim.py)

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
        if self.half:
            prec += {"ddp": " autocast over fp32 weights",
                     "fsdp": " compute over fp32 shards (MixedPrecisionPolicy)"}.get(
                self.backend, " engine over fp32 masters")
        if self.backend == "deepspeed" and self.half:
            prec += f", {self.grad_accum_dtype or self.precision} gradient accumulation"
        ckpt = "with" if self.checkpointing else "no"
        return f"{what}, {prec}, {ckpt} gradient checkpointing"


def _dtype_name(value) -> str | None:
    """DeepSpeed's spelling of a dtype ("fp32", "float32", "torch.float32", ...) as fp32, bf16 or
    fp16; None where unset."""
    if value in (None, "auto"):
        return None
    name = str(value).lower().replace("torch.", "")
    return {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
            "half": "fp16"}.get(name, name)


ZERO3_KNOBS = {  # DeepSpeed 0.19's defaults where the JSON leaves a knob out
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_model_persistence_threshold": 2**63 - 1,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
}


def deepspeed_choices(config: dict) -> dict:
    """What memory_bytes needs from a DeepSpeed JSON (its "auto" values are resolved later,
    against the model's hidden size, as Accelerate resolves them)."""
    zero = config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    device = lambda key: (zero.get(key) or {}).get("device", "none") not in ("none", None)  # noqa
    knobs = {k: zero.get(k, zero.get(k.replace("stage3_", ""), default))
             for k, default in ZERO3_KNOBS.items()}
    return dict(backend="deepspeed", shard=stage, offload_optimizer=device("offload_optimizer"),
                offload_params=device("offload_param") and stage == 3,
                grad_accum_dtype=_dtype_name((config.get("data_types") or {}).get(
                    "grad_accum_dtype")),
                zero3=tuple(sorted(knobs.items())) if stage == 3 else ())


def _repo_deepspeed(path: str, s: Setup) -> dict:
    """deepspeed_choices of one of the repository's ds_configs (a suggestion names it), filled
    as the run would fill it for `s`; of an empty config where the file is not there."""
    from .parallel.deepspeed import deepspeed_config

    file = Path(__file__).resolve().parent.parent / path
    cfg = TrainingConfig(output_dir="plan", mixed_precision=s.precision,
                         per_device_train_batch_size=s.micro_batch,
                         gradient_accumulation_steps=s.accumulation)
    try:
        return deepspeed_choices(deepspeed_config(str(file), cfg, s.num_gpus))
    except UsageError:
        offload = {"offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}
        return deepspeed_choices({"zero_optimization": {
            "stage": 3, **(offload if "offload" in path else {})}})


def setup_of(train_cfg: TrainingConfig, block_size: int, num_gpus: int,
             eager_attention: bool) -> Setup:
    """The backend the run would use (`parallel.choose`, as the run chooses it, errors
    included), on `num_gpus`."""
    from . import parallel
    from .parallel.launch import resolve_mixed_precision

    common = dict(precision=resolve_mixed_precision(train_cfg.mixed_precision),
                  micro_batch=train_cfg.per_device_train_batch_size,
                  accumulation=train_cfg.gradient_accumulation_steps,
                  checkpointing=train_cfg.gradient_checkpointing, num_gpus=num_gpus,
                  optim=train_cfg.optim,
                  block_size=block_size, eager_attention=eager_attention)
    choice = parallel.choose(train_cfg, num_gpus)
    if choice.name == "deepspeed":
        return Setup(**deepspeed_choices(choice.deepspeed_config), **common)
    if choice.name == "fsdp":
        return Setup("fsdp", 3, False, False, **common)  # full_shard, the one mode supported
    return Setup("ddp", 0, False, False, **common)


# --- memory

class MemoryContext(NamedTuple):
    """What a backend's `memory_terms` is handed to list its model-state terms with."""

    add: Callable       # add(kind, what, bytes, offload=None, stage=0)
    part: Callable      # part(stage): the divisor of a term sharded from ZeRO stage `stage` on
    c: int              # bytes of a value in the compute dtype
    dt: str             # the compute dtype's name
    masters: str        # a note on the fp32 masters of a 16-bit checkpoint ("" for fp32)
    opt: object         # the optimizer's state (optim.StateSize): bytes a parameter, description


def memory_terms(shape: Shape, s: Setup) -> list[tuple[str, str, float, str | None]]:
    """Per-GPU bytes alive at the peak of a step (the start of a micro-batch's backward pass),
    term by term: (kind, what, bytes, offload), `offload` naming the ZeRO offload that moves
    the term to host memory ("optimizer", "params") or None.

    The weights the optimizer updates are fp32 whatever dtype a checkpoint was saved in
    (model.build_model loads them so): bf16/fp16 is compute only, through autocast (DDP),
    FSDP's MixedPrecisionPolicy, or the 16-bit model of DeepSpeed's engine, whose optimizer
    keeps fp32 master partitions.
    """
    p, n, z = shape.params, s.num_gpus, s.shard
    c = 2 if s.half else 4  # bytes of a value in the compute dtype
    opt = optim.state_size(s.optim, p, shape.hidden_matrices)  # opt.state_bytes a parameter
    dt = s.precision if s.half else "fp32"
    terms = []

    def add(kind, what, nbytes, offload=None, stage=0):
        if stage and z >= stage and n > 1:
            what += f", 1/{n} shard"
        terms.append((kind, what, float(nbytes), offload))

    part = lambda stage: n if z >= stage else 1  # noqa: E731 (divisor of a sharded term)
    loaded = shape.checkpoint_dtype not in (None, "float32")
    masters = f" (the checkpoint's {shape.checkpoint_dtype} loaded as fp32)" if loaded else ""
    # the model's states (weights, gradients, optimizer) as the backend keeps them
    BACKENDS[s.backend].memory_terms(shape, s, MemoryContext(add, part, c, dt, masters, opt))
    if s.backend == "deepspeed" and z == 3:
        live, why = zero3_gathered(shape, s)
        add("weights", f"ZeRO-3 gathered {dt} parameters: {_m(live)} of {_m(p)} ({why})",
            c * live)
        add("gradients", f"{dt} gradient of the largest module, before its reduce-scatter",
            c * shape.largest_layer)
    layers, _ = activation_bytes(shape, s)
    terms.append(("activations", f"activations of {shape.n_layer} layers"
                  + (" (checkpointed: their inputs and one layer's)" if s.checkpointing else ""),
                  layers, None))
    terms += [("logits", what, nbytes, None) for what, nbytes in logits_terms(shape, s)]
    return terms


def memory_bytes(shape: Shape, s: Setup) -> dict:
    """Per-GPU bytes at the peak of a step, by kind (the logits are also in activations), the
    terms themselves, and what offloading keeps on the host."""
    out = dict.fromkeys(("weights", "gradients", "optimizer", "activations", "logits",
                         "gathered", "host"), 0.0)
    terms = []
    for kind, what, nbytes, offload in memory_terms(shape, s):
        host = (offload == "optimizer" and s.offload_optimizer) or \
            (offload == "params" and s.offload_params)
        terms.append({"kind": kind, "what": what, "bytes": nbytes,
                      "where": "host" if host else "gpu"})
        if host:
            out["host"] += nbytes
            continue
        out["activations" if kind == "logits" else kind] += nbytes
        if kind == "logits":
            out["logits"] += nbytes
        if what.startswith("ZeRO-3 gathered"):
            out["gathered"] += nbytes
    out["total"] = sum(out[k] for k in ("weights", "gradients", "optimizer", "activations"))
    out["terms"] = terms
    return out


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
    residual stream's dtype (fp32 under autocast, 16-bit under DeepSpeed and FSDP's bf16/fp16
    parameters), and one layer's full set exists at a time while it is recomputed.

    Logits: logits_terms.
    """
    b, t, h, a = s.micro_batch, s.block_size, shape.hidden, shape.n_head
    per_layer = b * t * h * (34 + (5 * a * t / h if s.eager_attention else 0))
    if not s.half:
        per_layer *= 2
    if s.checkpointing:
        residual = 2 if (s.half and s.backend in ("deepspeed", "fsdp")) else 4
        layers = shape.n_layer * b * t * h * residual + per_layer
    else:
        layers = shape.n_layer * per_layer
    return float(layers), float(sum(nbytes for _, nbytes in logits_terms(shape, s)))


# bytes per value of one loss chunk at its peak: fp32 upcast 4 + log-softmax 4 + 16-bit gradient 2
LOSS_CHUNK_BYTES = 10


def logits_terms(shape: Shape, s: Setup) -> list[tuple[str, float]]:
    """What the loss (loop.token_nll -> loop.nll_sum) holds at its peak, the backward of its
    last chunk, as (what, bytes); measured on CPU to the byte in tests/test_plan.py.

    Under bf16/fp16 (autocast, FSDP's param dtype, DeepSpeed's 16-bit model) the logits reach
    the loss in 16 bits (parallel.base.autocast_outputs drops Accelerate's fp32 conversion), and
    kept there for the chunks' recomputation: 2 bytes a value, and their gradient as many,
    gathered from the chunks'. Each chunk of loop.LOSS_CHUNK_ELEMENTS // vocab rows is upcast
    and log-softmaxed again in the backward: 10 bytes a value of one chunk. Logits of one
    chunk or less, and fp32 logits (no mixed precision), go to cross-entropy whole: its
    log-softmax, the gradient of that and the logits' gradient, 3 x 4 bytes a value (the
    logits themselves are not kept). --torch_compile's compiled loss is not modelled.
    """
    from . import loop

    tokens, vocab = s.micro_batch * s.block_size, shape.vocab
    rows = max(1, loop.LOSS_CHUNK_ELEMENTS // vocab)
    if s.half and tokens > rows:
        return [(f"{s.precision} logits and their gradient, 2 x 2 B x {tokens:,} tokens x "
                 f"{vocab:,}", 4.0 * tokens * vocab),
                (f"one fp32 loss chunk of {rows:,} rows recomputed in the backward, "
                 f"{LOSS_CHUNK_BYTES} B x {rows:,} x {vocab:,}",
                 float(LOSS_CHUNK_BYTES * min(rows, tokens) * vocab))]
    what = f"{s.precision} logits upcast whole (one chunk)" if s.half else "fp32 logits"
    return [(f"{what}: log-softmax, its gradient, the logits' gradient, 3 x 4 B x {tokens:,} "
             f"tokens x {vocab:,}", 12.0 * tokens * vocab)]


def zero3_knobs(shape: Shape, s: Setup) -> dict:
    """The ZeRO-3 knobs of the run's JSON (parallel.deepspeed.deepspeed_config has filled its
    "auto"s; one left is filled the same way here), DeepSpeed's defaults where left out."""
    from .parallel.deepspeed import DS_SIZES

    h = shape.hidden  # Accelerate's own "auto", where we set no value of our own
    auto = {"stage3_prefetch_bucket_size": int(0.9 * h * h),
            "stage3_param_persistence_threshold": 10 * h, **DS_SIZES}
    knobs = dict(ZERO3_KNOBS, **dict(s.zero3))
    return {k: int(float(auto.get(k, ZERO3_KNOBS[k]) if v == "auto" else v))
            for k, v in knobs.items()}


def zero3_gathered(shape: Shape, s: Setup) -> tuple[int, str]:
    """Parameters ZeRO-3 holds gathered at once in a step (a steady one: the trace recorded),
    and why, in words.

    DeepSpeed 0.19.8 (partitioned_param_coordinator.py) gathers a module's parameters before
    it runs and releases them after, unless they are persistent (numel at most
    stage3_param_persistence_threshold: gathered once, kept) or used again within
    stage3_max_reuse_distance parameters of the trace (forward, then backward). In the forward
    that keeps every parameter whose backward comes within that distance: with zero3.json's
    1e9, all of any model under ~0.5B parameters at the start of the backward.
    stage3_max_live_parameters does not force releases: it only caps the prefetch
    (min(max_live - gathered, stage3_prefetch_bucket_size) per fetch). Hence a replay of the
    coordinator over the model's modules, in forward and reverse order, rather than a formula
    (tests/test_plan.py checks it against a real ZeRO-3 engine on CPU).
    """
    if not shape.units:
        return shape.params, "no module trace: all of them"
    k = zero3_knobs(shape, s)
    live = _replay_zero3(shape.units, shape.numels, k["stage3_prefetch_bucket_size"],
                         k["stage3_param_persistence_threshold"],
                         k["stage3_model_persistence_threshold"],
                         k["stage3_max_live_parameters"], k["stage3_max_reuse_distance"])
    why = (f"max_reuse_distance {k['stage3_max_reuse_distance']:.0e}, prefetch "
           f"{k['stage3_prefetch_bucket_size']:.0e}, max_live "
           f"{k['stage3_max_live_parameters']:.0e}, persistence threshold "
           f"{k['stage3_param_persistence_threshold']:,}")
    return live, why


@functools.lru_cache(maxsize=16)
def _replay_zero3(units: tuple, numels: tuple, prefetch: int, persist: int, model_persist: int,
                  max_live: int, max_reuse: int) -> int:
    """PartitionedParameterCoordinator's fetch, prefetch and release over one forward and
    backward with a complete trace; the most parameters gathered at once."""
    persistent, kept = set(), 0
    for i, numel in enumerate(numels):  # parameter_offload.mark_persistent_parameters
        if numel + kept <= model_persist and numel <= persist:
            persistent.add(i)
            kept += numel
    trace = units + units[::-1]
    queue = deque((i, step) for step, unit in enumerate(trace) for i in sorted(set(unit)))
    recent: dict = {}  # the latest step a parameter was fetched for
    gathered = set(persistent)
    live, counted = kept, 0  # all gathered; those counted since the step began (n_available)
    peak = live
    for step, unit in enumerate(trace):
        params = set(unit)
        for i in params - gathered:  # fetch_sub_module
            gathered.add(i)
            live, counted = live + numels[i], counted + numels[i]
        for _ in range(sum(1 for i in params if recent.get(i, -1) < step)):
            if not queue:
                break
            i, used = queue.popleft()  # this module's own entries leave the prefetch queue
            recent[i] = used
        if prefetch > 0:
            budget, fetched, new = min(max_live - counted, prefetch), 0, set()
            while queue and fetched < budget:
                i, used = queue.popleft()
                recent[i] = max(recent.get(i, -1), used)
                if i not in gathered and i not in new:
                    new.add(i)
                    fetched += numels[i]
            gathered |= new
            live, counted = live + fetched, counted + fetched
        peak = max(peak, live)
        nxt = step + 1  # release_sub_module, after the module ran: __params_to_release
        release = {i for i in params if i not in persistent and recent.get(i, -1) <= nxt}
        traversed = 0
        for later in trace[nxt:]:
            if traversed >= max_reuse or not release:
                break
            for i in later:
                release.discard(i)
                traversed += numels[i]
        for i in release & gathered:
            gathered.discard(i)
            live, counted = live - numels[i], counted - numels[i]
    return peak


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
        # planned with the repository's JSON (its live-parameter knobs, its accumulation dtype)
        out.append(("DeepSpeed ZeRO-3", f"--deepspeed {ZERO3_JSON}",
                    _repo_deepspeed(ZERO3_JSON, s), 1.5))
        out.append(("FSDP full_shard", "--fsdp full_shard",
                    dict(backend="fsdp", shard=3, offload_optimizer=False,
                         offload_params=False, grad_accum_dtype=None, zero3=()), 1.6))
    if not s.checkpointing:
        out.append(("gradient checkpointing", "--gradient_checkpointing",
                    dict(checkpointing=True), 2.0))
    if not (s.offload_optimizer and s.offload_params):
        out.append(("DeepSpeed ZeRO-3 with offload to host", f"--deepspeed {ZERO3_OFFLOAD_JSON}",
                    _repo_deepspeed(ZERO3_OFFLOAD_JSON, s), 5.0))
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


def make_plan(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig,
              topology: Topology = Topology()) -> dict:
    """Every figure of the plan, as the JSON line prints them; for --dry_run_num_gpus GPUs,
    else for as many as the launcher started (`topology`)."""
    name, memory = local_gpu()
    gpu = train_cfg.dry_run_gpu or (name if name in PEAK_FLOPS else DEFAULT_GPU)
    gpu_gib = train_cfg.dry_run_gpu_memory_gb or memory or DEFAULT_GPU_MEMORY_GIB
    num_gpus = train_cfg.dry_run_num_gpus or topology.world_size
    shape = model_shape(data_cfg, model_cfg)
    s = setup_of(train_cfg, data_cfg.block_size, num_gpus,
                 model_cfg.attn_implementation == "eager")
    mem = memory_bytes(shape, s)
    tokens_per_step = s.micro_batch * s.accumulation * num_gpus * data_cfg.block_size
    peak = PEAK_FLOPS[gpu]
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
        "checkpoint_dtype": shape.checkpoint_dtype,
        "memory_gib": {k: gib(mem[k]) for k in ("weights", "gradients", "optimizer",
                                                "activations", "logits", "gathered", "total")},
        "memory_terms": [{"kind": t["kind"], "what": t["what"], "gib": gib(t["bytes"]),
                          "where": t["where"]} for t in mem["terms"]],
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
        f"{m['logits']:.2f}) = {m['total']:.2f} GiB, at the start of a backward pass:",
    ]
    for t in plan["memory_terms"]:
        where = " (in host memory)" if t["where"] == "host" else ""
        lines.append(f"    {t['kind']:<12}{t['gib']:7.2f}  {t['what']}{where}")
    if plan["host_gib_per_gpu"]:
        lines.append(f"  offloaded         {plan['host_gib_per_gpu']:.2f} GiB per GPU in host "
                     "memory")
    if plan["deepspeed_estimate_gib"] is not None:
        # its estimator counts one gathered layer, not what the coordinator keeps gathered
        ours = m["weights"] + m["gradients"] + m["optimizer"] - m["gathered"]
        lines.append(f"  DeepSpeed says    {plan['deepspeed_estimate_gib']:.2f} GiB for weights, "
                     f"gradients and optimizer states (ours: {ours:.2f}, and "
                     f"{m['gathered']:.2f} of gathered parameters it does not count)")
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


def print_plan(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig,
               topology: Topology = Topology()) -> dict:
    """Print the plan (once, on rank 0 of a launch) and return it."""
    plan = make_plan(data_cfg, model_cfg, train_cfg, topology)
    if topology.is_main:
        print("\n".join(format_plan(plan)))
        print(json.dumps(plan), flush=True)
    return plan
