"""Sampling from any model folder this project writes (final or checkpoint) or any Hub causal LM.

    python generate.py --model outputs/demo --prompt "The model" --prompt "A function" --max_new_tokens 40

LoRA runs load too: a checkpoint or a `--merge_adapters false` folder holds peft adapters, which
are merged into the base model they name (clm.export.load_plain_model, shared with export).

Prompts are batched with left padding and an attention mask, so a batch gives the same greedy
text as each prompt alone. The model's generation_config (EOS/pad, suppressed padding ids)
applies; the options here override it. Same seed, same text.

Chat (`--chat`): messages are rendered with the model's chat template (the one run_sft.py saved
with it, or the tokenizer's own) and a generation prompt; the reply ends at the template's
end-of-turn token or EOS and only it is printed. Special-token text typed by the user is plain
text, as in finetuning (clm.sft). `chat_loop` keeps the history across turns and cuts the
oldest turns when it outgrows the model's context.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from .config import _help
from .errors import UsageError


@dataclass
class SamplingConfig:
    """What to sample and how."""

    model: Optional[str] = _help("Model folder (final, checkpoints/step-N or LoRA adapters) or "
                                 "Hub name.", default=None)
    prompt: Optional[list[str]] = field(default=None, metadata={
        "help": "Prompt(s) to complete; repeat --prompt for a batch. With --chat: the user's "
                "message.", "action": "extend"})
    max_new_tokens: int = _help("Tokens to generate per completion.", default=64)
    do_sample: bool = _help("Sample (true) or decode greedily (false).", default=True)
    temperature: float = _help("Softmax temperature (> 0).", default=0.8)
    top_k: int = _help("Sample among the k most likely tokens (0: no limit).", default=50)
    top_p: float = _help("Nucleus sampling mass in (0, 1].", default=1.0)
    repetition_penalty: float = _help("Penalty > 1 discourages repeats (1: none).", default=1.0)
    num_return_sequences: int = _help("Completions per prompt.", default=1)
    seed: int = _help("Seed: the same seed gives the same text.", default=1337)
    stream: Optional[bool] = field(default=None, metadata={
        "help": "Print tokens as they are generated (prompts one at a time). Default: on with "
                "--chat, off otherwise.", "nargs": "?", "const": True})
    chat: bool = _help("Chat with the model through its chat template: --prompt is the user's "
                       "message and only the reply is printed; without --prompt, read messages "
                       "from stdin, one a line (/reset clears the history, /quit or Ctrl-D "
                       "ends).", default=False)
    system: Optional[str] = _help("System message for --chat (if the chat template has a "
                                  "system role).", default=None)
    device: str = _help("auto (CUDA if available), cpu or cuda.", default="auto")
    dtype: str = _help("auto (bf16 on CUDA where supported, else fp32), float32, bfloat16 or "
                       "float16.", default="auto")

    def __post_init__(self):
        if not self.model:
            raise UsageError("--model is required (a folder written by train_clm.py, a "
                             "checkpoint folder, or a Hub name)")
        if not self.prompt and not self.chat:
            raise UsageError("--prompt is required (repeat it for several prompts; or pass "
                             "--chat to chat interactively)")
        if self.stream is None:
            self.stream = self.chat  # a chat reply streams unless told otherwise
        checks = [(self.max_new_tokens >= 1, "--max_new_tokens must be >= 1"),
                  (self.temperature > 0, "--temperature must be > 0"),
                  (self.top_k >= 0, "--top_k must be >= 0 (0 disables it)"),
                  (0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
                  (self.repetition_penalty > 0, "--repetition_penalty must be > 0"),
                  (self.num_return_sequences >= 1, "--num_return_sequences must be >= 1"),
                  (self.do_sample or self.num_return_sequences == 1,
                   "--num_return_sequences > 1 needs sampling (drop --do_sample false)"),
                  (not self.chat or self.num_return_sequences == 1,
                   "--num_return_sequences > 1 does not go with --chat (one reply per turn)"),
                  (not self.chat or len(self.prompt or []) <= 1,
                   ("--chat takes one --prompt, the user's message (leave it out to chat "
                    "interactively)")),
                  (self.chat or self.system is None, "--system needs --chat")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        check_device(self.device, self.dtype)


def check_device(device: str, dtype: str) -> None:
    """The --device and --dtype options of load_model's callers (generate.py, clm.evaluate)."""
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError("--device must be auto, cpu or cuda")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError("--dtype must be auto, float32, bfloat16 or float16")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available (use --device cpu)")


def load_model(name: str, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) ready for generation: a model folder, a LoRA checkpoint or adapter
    folder (merged into its base), or a Hub name; a folder without a model is a UsageError."""
    from .export import load_plain_model

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dt = getattr(torch, dtype)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" is noise before a reply or an error
    try:
        model, tokenizer = load_plain_model(name, dt, arg="--model ")
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model = model.to(dev)
    tokenizer.padding_side = "left"  # completions start right after every prompt
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def generation_kwargs(cfg: SamplingConfig, tokenizer) -> dict:
    kwargs = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample,
              "num_return_sequences": cfg.num_return_sequences,
              "repetition_penalty": cfg.repetition_penalty,
              "pad_token_id": tokenizer.pad_token_id}
    if cfg.do_sample:
        kwargs.update(temperature=cfg.temperature, top_k=cfg.top_k or None, top_p=cfg.top_p)
    else:  # greedy: no sampling knobs (transformers warns about unused ones)
        kwargs.update(temperature=None, top_k=None, top_p=None)
    return kwargs


@torch.no_grad()
def complete(model, tokenizer, prompts: list[str], cfg: SamplingConfig, streamer=None) -> list[str]:
    """Prompt + completion for each prompt (num_return_sequences each, grouped by prompt)."""
    torch.manual_seed(cfg.seed)
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    out = model.generate(**enc, **generation_kwargs(cfg, tokenizer), streamer=streamer)
    new = out[:, enc["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    prompts_rep = [p for p in prompts for _ in range(cfg.num_return_sequences)]
    return [p + t for p, t in zip(prompts_rep, texts)]


# ----------------------------------------------------------------------------- chat

_REPLY_PROBE = "ChatProbeReply"  # stands for an assistant message when templates are probed


def chat_template_of(tokenizer) -> Optional[str]:
    """The chat template the model came with: the one run_sft.py saved beside it (it sets one on
    tokenizers that have none, clm.sft.DEFAULT_CHAT_TEMPLATE), else the tokenizer's own; None
    when there is neither. Of several named templates, the "default" one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template or None


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the template ends an assistant turn with (ChatML's <|im_end|>,
    run_sft's EOS), found by rendering a reply and reading what follows it; [] if none."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_PROBE}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that refuses this conversation: EOS alone ends the reply
        return []
    at = text.rfind(_REPLY_PROBE)
    if at < 0:
        return []
    after = tokenizer(text[at + len(_REPLY_PROBE):], add_special_tokens=False)["input_ids"]
    special = _special_ids(tokenizer)
    return [next(i for i in after if i in special)] if any(i in special for i in after) else []


def chat_stop_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the template's end of turn, the model's and tokenizer's EOS."""
    ids = end_of_turn_ids(tokenizer)
    eos = getattr(model.generation_config, "eos_token_id", None)
    for i in ([] if eos is None else [eos] if isinstance(eos, int) else list(eos)) + \
            [tokenizer.eos_token_id]:
        if i is not None and i not in ids:
            ids.append(i)
    return ids


def _supports_system(tokenizer) -> bool:
    probe = "ChatProbeSystem"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # e.g. "System role not supported"
        return False
    return probe in text


def new_chat(tokenizer, cfg: SamplingConfig) -> list[dict]:
    """The history a chat starts from ([] or the system message), once the model is known to
    have a chat template (and a system role, for --system): a UsageError otherwise."""
    if chat_template_of(tokenizer) is None:
        raise UsageError(f"--chat: {cfg.model} has no chat template (finetune it on chat "
                         "records with finetune/run_sft.py, which saves one with the model, or "
                         "pass a model that has one)")
    if cfg.system is None:
        return []
    if not _supports_system(tokenizer):
        raise UsageError(f"--system: the chat template of {cfg.model} has no system role "
                         "(leave --system out, or put it in the message)")
    return [{"role": "system", "content": cfg.system}]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`:
    the template's special tokens are tokens, special-token text inside the messages is plain
    text (encoded as run_sft.py encoded it for training, clm.sft.segments)."""
    from .sft.templates import _CLOSE, _OPEN, _quote, _rendered_ids, _special_pattern

    specials = _special_pattern(tokenizer)
    markers = f"{_OPEN}|{_CLOSE}"
    wrap = re.compile(f"{specials}|{markers}" if specials else markers)
    quoted = re.compile(f"{_OPEN}({wrap.pattern}){_CLOSE}")
    text = tokenizer.apply_chat_template(_quote(messages, wrap), tokenize=False,
                                         add_generation_prompt=True)
    return _rendered_ids(tokenizer, text, quoted)


def context_size(model) -> Optional[int]:
    config = model.config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def fit_to_context(model, tokenizer, messages: list[dict], max_new_tokens: int,
                   err=None) -> list[int]:
    """Prompt ids of `messages` (which end with the user's message) that leave room for
    max_new_tokens in the model's context: the oldest turns are dropped from `messages` (in
    place; the system message stays) until they fit, and `err` is told. A last message that
    does not fit alone is a UsageError."""
    ids = chat_prompt_ids(tokenizer, messages)
    size = context_size(model)
    if size is None:
        return ids
    budget = size - max_new_tokens
    where = (f"the {budget} tokens left in the model's context of {size} by --max_new_tokens "
             f"{max_new_tokens}")
    if budget <= 0:
        raise UsageError(f"--max_new_tokens {max_new_tokens} leaves no room for the chat in the "
                         f"model's context of {size} tokens (lower it)")
    first = 1 if messages and messages[0]["role"] == "system" else 0
    kept, dropped = list(messages), 0
    while len(ids) > budget and len(kept) - first > 1:
        del kept[first]  # the oldest turn: its user message, then its reply
        while len(kept) - first > 1 and kept[first]["role"] != "user":
            del kept[first]
        dropped += 1
        ids = chat_prompt_ids(tokenizer, kept)
    if len(ids) > budget:  # the history stays as it was
        raise UsageError(f"the message is {len(ids)} tokens with the chat template, over "
                         f"{where} (shorten it, or lower --max_new_tokens)")
    messages[:] = kept
    if dropped:
        turns = f"{dropped} oldest turns" if dropped > 1 else "oldest turn"
        print(f"chat: dropped the {turns} to fit the history in {where}",
              file=err or sys.stderr, flush=True)
    return ids


def chat_streamer(tokenizer, out=None):
    """A TextStreamer of the reply alone (no prompt, no special tokens), written to `out`."""
    from transformers import TextStreamer

    class _Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            stream = out or sys.stdout
            stream.write(text + ("\n" if stream_end else ""))
            stream.flush()

    return _Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


@torch.no_grad()
def chat_reply(model, tokenizer, messages: list[dict], cfg: SamplingConfig, streamer=None,
               err=None) -> str:
    """The assistant's reply to `messages` (ending with the user's message), without special
    tokens; generation stops at the template's end of turn or EOS. The history is cut to fit
    the model's context first (fit_to_context). Seeding is the caller's."""
    ids = fit_to_context(model, tokenizer, messages, cfg.max_new_tokens, err)
    input_ids = torch.tensor([ids], device=model.device)
    kwargs = dict(generation_kwargs(cfg, tokenizer), eos_token_id=chat_stop_ids(model, tokenizer))
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                         streamer=streamer, **kwargs)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()


def chat_once(model, tokenizer, cfg: SamplingConfig, out=None, err=None) -> str:
    """One reply to --prompt (after --system), printed (streamed with --stream) to `out`."""
    out = out or sys.stdout
    messages = new_chat(tokenizer, cfg) + [{"role": "user", "content": cfg.prompt[0]}]
    torch.manual_seed(cfg.seed)
    streamer = chat_streamer(tokenizer, out) if cfg.stream else None
    reply = chat_reply(model, tokenizer, messages, cfg, streamer, err)
    if streamer is None:
        print(reply, file=out, flush=True)
    return reply


def _read_line(inp, out, tty: bool) -> Optional[str]:
    """The next line of `inp` (None at its end), after the prompt `> ` where it is a terminal."""
    if tty and inp is sys.stdin:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        try:
            return input("> ")
        except EOFError:
            return None
    if tty:
        out.write("> ")
        out.flush()
    line = inp.readline()
    return line if line else None


def chat_loop(model, tokenizer, cfg: SamplingConfig, inp=None, out=None, err=None) -> list[dict]:
    """Chat turn by turn: a message a line from `inp` (stdin), each reply to `out` (stdout).
    `/reset` clears the history (the system message stays), `/quit` or the end of the input
    ends the chat; Ctrl-C stops the reply being generated (its turn is dropped), not the chat.
    Returns the history as it ends."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    messages = new_chat(tokenizer, cfg)
    start = len(messages)
    tty = bool(getattr(inp, "isatty", lambda: False)())
    torch.manual_seed(cfg.seed)  # once: the same session of messages gives the same replies
    while True:
        try:
            line = _read_line(inp, out, tty)
        except KeyboardInterrupt:  # at the prompt: a fresh line, as a shell does
            out.write("\n")
            continue
        if line is None:
            if tty:
                out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text == "/quit":
            break
        if text == "/reset":
            del messages[start:]
            print("(history cleared)", file=err, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        streamer = chat_streamer(tokenizer, out) if cfg.stream else None
        try:
            reply = chat_reply(model, tokenizer, messages, cfg, streamer, err)
        except KeyboardInterrupt:
            out.write("\n")
            out.flush()
            print("(reply stopped; that message is dropped from the history)", file=err,
                  flush=True)
            messages.pop()
            continue
        except UsageError as e:  # a message longer than the context: the chat goes on
            print(f"error: {e}", file=err, flush=True)
            messages.pop()
            continue
        if streamer is None:
            print(reply, file=out, flush=True)
        messages.append({"role": "assistant", "content": reply})
    return messages
