"""Attention for training: plain causal rows reach SDPA with no mask (its `is_causal` path).

    python -c "import clm.attention as a; print(a.sdpa_kernels('cuda', 'bf16', 'sdpa', masked=False))"

A pretraining batch is rows of packed tokens with no padding: causal attention over each row is
all it needs, and SDPA's flash kernel serves exactly that (`is_causal=True`, no mask). But
transformers' GPT-2 builds its position ids itself and hands them to `create_causal_mask`,
whose packed-sequence check either syncs with the host (`.all()`, eager) or, under
`torch.compile`, cannot conclude "not packed" while tracing and materialises a 4-D mask, which
SDPA then receives with `is_causal=False` (and which the flash kernel refuses).

So for such rows (no attention mask, no position ids) the model's `sdpa` is swapped, for that
forward pass only, for `sdpa_causal`: transformers' own SDPA attention function registered under
a name that has no mask function, which makes transformers skip mask creation altogether (the
hook it keeps for attention back-ends that need no mask). Padded or packed-example batches
(finetuning), evaluation tasks and generation keep `sdpa` and its masks. Nothing is saved under
the new name: it is set and restored around each forward pass.

On CUDA, `sdpa_kernels` restricts plain rows to the flash kernel (and masked batches to flash or
memory-efficient): consistent by construction with what `causal_rows` makes the model pass.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from .errors import UsageError, first_line

CAUSAL_SDPA = "sdpa_causal"


def _causal_sdpa(module, query, key, value, attention_mask, **kwargs):
    # transformers skipped mask creation for this name; a mask here would be a caller's bug
    if attention_mask is not None:
        raise ValueError(f"{CAUSAL_SDPA} attention got a mask: use sdpa for masked batches")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAUSAL_SDPA, _causal_sdpa)


_register()


def model_config(model):
    """The transformers config of `model`, under any wrappers (DDP's and DeepSpeed's `.module`;
    a DeepSpeed engine's own `.config` is its JSON, not the model's)."""
    for _ in range(8):
        if not isinstance(getattr(model, "module", None), torch.nn.Module):
            break
        model = model.module
    config = getattr(model, "config", None)
    return config if hasattr(config, "_attn_implementation") else None


@contextmanager
def causal_rows(model, plain: bool = True):
    """Run `model`'s forward passes inside as plain causal rows (no mask built or passed) when
    `plain` and its attention is `sdpa`; otherwise as they are."""
    config = model_config(model) if plain else None
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        yield
        return
    config._attn_implementation = CAUSAL_SDPA
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


# ----------------------------------------------------------------------------- SDPA kernels

# chosen once per process by choose_attention(): {masked: kernels}, None where unrestricted
_SDPA_BACKENDS: dict | None = None


def sdpa_kernels(device_type: str, mixed_precision: str, attn_implementation: str,
                 masked: bool) -> list | None:
    """The SDPA kernels a training forward pass is limited to (None: SDPA chooses).

    On CUDA with SDPA under bf16/fp16: the flash kernel alone for plain causal rows, which reach
    SDPA with no mask and `is_causal=True` (`causal_rows`): a silent fallback to the math
    kernel would be several times slower and hold the T x T scores. Masked batches (padding,
    packed examples) carry a mask, which flash cannot take: the memory-efficient kernel too.
    """
    if device_type != "cuda" or attn_implementation != "sdpa" or \
            mixed_precision not in ("bf16", "fp16"):
        return None
    from torch.nn.attention import SDPBackend

    return [SDPBackend.FLASH_ATTENTION] + ([SDPBackend.EFFICIENT_ATTENTION] if masked else [])


def choose_attention(device: torch.device, mixed_precision: str, attn_implementation: str,
                     head_dim: int) -> list | None:
    """Decide the kernels for this process's training forward passes (`sdpa_backends`).

    Probed now on a tensor of the model's head size, called as plain rows will call it (no
    mask, causal), so that a GPU or shape the flash kernel cannot serve is a one-line error
    before training instead of a silent fallback. Returns the kernels for plain rows.
    """
    global _SDPA_BACKENDS
    _SDPA_BACKENDS = None
    chosen = sdpa_kernels(device.type, mixed_precision, attn_implementation, masked=False)
    if chosen is None:
        return None
    from torch.nn.attention import sdpa_kernel

    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    q = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype)
    try:
        with sdpa_kernel(chosen):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=None,
                                                             is_causal=True)
    except RuntimeError as e:
        raise UsageError(f"SDPA's flash kernel cannot run on {torch.cuda.get_device_name(device)}"
                         f" for head size {head_dim} in {mixed_precision}: {first_line(e)} (use "
                         "an Ampere or newer GPU, or --attn_implementation eager)") from None
    _SDPA_BACKENDS = {masked: sdpa_kernels(device.type, mixed_precision, attn_implementation,
                                           masked) for masked in (False, True)}
    return chosen


def attention_kernels() -> str:
    """The SDPA kernels this process's training forward passes are limited to, for reports."""
    return "any" if _SDPA_BACKENDS is None else ",".join(b.name for b in _SDPA_BACKENDS[False])


def sdpa_backends(masked: bool = False):
    """The context a training forward pass runs in: SDPA limited to the kernels
    choose_attention() picked for this kind of batch; a no-op on CPU."""
    if _SDPA_BACKENDS is None:
        return nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(_SDPA_BACKENDS[masked])
