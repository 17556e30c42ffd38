"""GPT-2 models: size presets, from-scratch or pretrained, vocab padding, FLOPs for MFU.

    python -c "from clm.model import PRESET_SHAPES; print(PRESET_SHAPES)"

From scratch the model is `GPT2LMHeadModel(GPT2Config(...))`, whose own initialisation is
GPT-2's (normal 0.02, residual projections scaled by 1/sqrt(2 * n_layer)). The vocabulary is
padded to a multiple of 64 for faster matmuls; the padded ids are never targets and are listed
in `generation_config.suppress_tokens`, so generation never produces them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .config import ModelConfig
from .errors import UsageError, first_line

# (n_layer, n_head, n_embd, n_positions); the GPT-2 sizes are the published ones.
PRESET_SHAPES = {
    "tiny": (4, 4, 128, 256),
    "gpt2": (12, 12, 768, 1024),
    "gpt2-medium": (24, 16, 1024, 1024),
    "gpt2-large": (36, 20, 1280, 1024),
    "gpt2-xl": (48, 25, 1600, 1024),
}
VOCAB_MULTIPLE = 64


def padded_vocab(n: int) -> int:
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def preset_config(name: str, vocab_size: int, bos_token_id: int | None = None,
                  eos_token_id: int | None = None):
    """The GPT2Config of `--model_preset name` (what the run trains and --dry_run plans)."""
    from transformers import GPT2Config

    n_layer, n_head, n_embd, n_positions = PRESET_SHAPES[name]
    # no dropout: single-epoch pretraining does not overfit, and without it a step's maths is
    # independent of how it is split
    return GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                      vocab_size=vocab_size, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      activation_function=FAST_GELU, bos_token_id=bos_token_id,
                      eos_token_id=eos_token_id)


def head_options(config, cfg: ModelConfig) -> None:
    """--untie_word_embeddings on a from-scratch `config` (the run's and --dry_run's)."""
    if cfg.untie_word_embeddings:
        config.tie_word_embeddings = False


def check_block_size(config, block_size: int) -> None:
    """--block_size within the positions of the model `config` describes (any causal LM's)."""
    positions = getattr(config, "n_positions", None) or \
        getattr(config, "max_position_embeddings", None)
    if positions and block_size > positions:
        raise UsageError(f"--block_size {block_size} is above the model's {positions} positions "
                         f"(use --block_size {positions} or less)")


def build_model(cfg: ModelConfig, tokenizer, block_size: int):
    """The model to train, checked against the tokenizer and block size before any work.

    Always in float32, whatever the checkpoint's or config's dtype: these are the master
    weights the optimizer updates (and its states take their dtype); bf16/fp16 compute comes
    from autocast (--mixed_precision). Left to transformers ("auto"), a bf16 checkpoint would
    train in pure bf16, where an update below half a bf16 step of its weight (~0.4% of it;
    an Adam step of 2e-5 on a 0.02 weight is 0.1%) rounds away to nothing.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2LMHeadModel

    if cfg.attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        raise UsageError("--attn_implementation flash_attention_2 needs a CUDA GPU and this "
                         "machine has none (run on a GPU node, or pass --attn_implementation "
                         "sdpa)")
    kwargs = {"attn_implementation": cfg.attn_implementation, "dtype": torch.float32}
    if cfg.model_name_or_path:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path, **kwargs)
        except Exception as e:
            first = first_line(e)
            raise UsageError(f"could not load --model_name_or_path {cfg.model_name_or_path}: "
                             f"{first} (pass a Hub name or a folder with a model)") from None
    else:
        if cfg.config_name:
            try:
                config = AutoConfig.from_pretrained(cfg.config_name)
            except Exception as e:
                raise UsageError(f"could not load --config_name {cfg.config_name}: "
                                 f"{str(e).strip().splitlines()[0]} (pass a folder with a "
                                 "config.json)") from None
            config.vocab_size = padded_vocab(len(tokenizer))
            config.bos_token_id = tokenizer.bos_token_id or tokenizer.eos_token_id
            config.eos_token_id = tokenizer.eos_token_id
        else:
            config = preset_config(cfg.model_preset, padded_vocab(len(tokenizer)),
                                   tokenizer.bos_token_id or tokenizer.eos_token_id,
                                   tokenizer.eos_token_id)
        config.use_cache = False
        config.dtype = torch.float32  # what GPT2LMHeadModel(config) builds, whatever it said
        head_options(config, cfg)
        model = GPT2LMHeadModel(config) if config.model_type == "gpt2" else \
            AutoModelForCausalLM.from_config(config, **kwargs)
        model.set_attn_implementation(cfg.attn_implementation)
        if cfg.zero_init_head:
            with torch.no_grad():
                model.get_output_embeddings().weight.zero_()
    use_fast_gelu(model)
    check_fits(model, tokenizer, block_size)
    set_generation_defaults(model, tokenizer)
    return model


def enable_gradient_checkpointing(model) -> None:
    """Keep only each transformer block's input in the forward pass and recompute the block in
    the backward (--gradient_checkpointing). Non-reentrant checkpointing, PyTorch's recommended
    kind: blocks whose inputs need no gradient (LoRA on a frozen model) work as they are, and
    the gradients are the same (the recomputation replays any dropout with the saved RNG
    state). Only in training mode: evaluation and generation run as before."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # newer transformers' name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


FAST_GELU = "gelu_pytorch_tanh"


def use_fast_gelu(model) -> None:
    """Give GPT-2's tanh GELU one fused kernel instead of eight elementwise ops.

    GPT-2's "gelu_new" is written in Python in transformers (0.5 x (1 + tanh(...)), each op
    its own kernel with its own saved activation); "gelu_pytorch_tanh" is the same function
    computed by `F.gelu(approximate="tanh")`, equal to rounding (~1e-7). It cost a tenth of a
    tiny model's step on CPU (bench/train_throughput.py). The saved config names the new one.
    """
    from transformers.activations import ACT2FN

    if getattr(model.config, "activation_function", None) != "gelu_new":
        return
    for module in model.modules():
        if type(module).__name__ == "NewGELUActivation":
            continue
        for name, child in module.named_children():
            if type(child).__name__ == "NewGELUActivation":
                setattr(module, name, ACT2FN[FAST_GELU])
    model.config.activation_function = FAST_GELU


def check_fits(model, tokenizer, block_size: int) -> None:
    check_block_size(model.config, block_size)
    vocab = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab} "
                         "embeddings (use the tokenizer the model was trained with)")


def set_generation_defaults(model, tokenizer) -> None:
    gen = model.generation_config
    gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    vocab = model.get_input_embeddings().weight.shape[0]
    gen.suppress_tokens = list(range(len(tokenizer), vocab)) or None


def num_params(model, non_embedding: bool = False) -> int:
    n = sum(p.numel() for p in model.parameters())
    if non_embedding:
        n -= model.get_input_embeddings().weight.numel()
        pos = getattr(getattr(model, "transformer", None), "wpe", None)
        n -= pos.weight.numel() if pos is not None else 0
    return n


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (PaLM, App. B): 6 per weight of the matmuls (the non-embedding
    parameters and the d x vocab output projection) plus attention's 12 * L * d * T."""
    c = model.config
    n_layer = getattr(c, "n_layer", None) or c.num_hidden_layers
    d = getattr(c, "n_embd", None) or c.hidden_size
    n = num_params(model, non_embedding=True)
    # The output projection is counted once, as 6 * d * vocab: an untied head's weight is
    # also among the non-embedding parameters and would count twice.
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        n -= head.weight.numel()
    return 6 * n + 6 * d * c.vocab_size + 12 * n_layer * d * seq_len


def compile_blocks(model) -> None:
    """`--torch_compile`: compile each transformer block in place, as torchtitan does.

    Called after activation checkpointing is applied (the recomputation wraps the compiled
    block) and before DDP wrapping or FSDP sharding (whose hooks then stay outside the compiled
    code). Identical blocks share one compiled graph; the embeddings, final norm and output
    projection stay eager (one matmul, and the loss is compiled on its own: loop.compile_loss).
    In place, not a wrapper: saved state keeps the model's own names (no `_orig_mod.`), so a
    checkpoint resumes with or without --torch_compile.
    """
    from .parallel.base import transformer_blocks

    for block in transformer_blocks(model):
        block.compile()


def eager():
    """A context in which compiled code runs eagerly: evaluation, benchmarks and sampling,
    whose shapes (eval batch, padded choices, a growing KV cache) and grad mode differ from
    training's, would otherwise each recompile the training graphs."""
    return torch.compiler.set_stance("force_eager")


@contextmanager
def eval_mode(model):
    """Eval mode and no autograd for the block; the model's training mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
