"""Sample text from a model this project trained (or any Hugging Face causal LM), or chat with it.

    python generate.py --model outputs/demo --prompt "The" --max_new_tokens 40
    python generate.py --model outputs/demo/checkpoints/step-100 --prompt "A" --prompt "The" --do_sample false
    python generate.py --model gpt2 --prompt "Hello" --stream
    python generate.py --model outputs/sft_demo/checkpoints/step-100 --prompt "def f(x):"
    python generate.py --model outputs/sft_demo --chat --prompt "What does f do?" --system "Brief."
    python generate.py --model outputs/sft_demo --chat      # interactive: > message, /reset, /quit

A LoRA run's checkpoints and its `--merge_adapters false` final folder hold peft adapters: they
are merged into the base model their adapter_config.json names (which must still be there).

Completions (prompt included) go to stdout, separated by a line of dashes when there are
several; `--seed` makes them reproducible.

`--chat` renders the messages with the model's chat template (the one run_sft.py saved with it,
or the tokenizer's own; a model with neither is refused) and prints only the reply, streamed,
which ends at the template's end-of-turn token or EOS. With `--prompt` it answers that one
message; without, it reads one message a line from stdin (a terminal or a pipe) and keeps the
history: `/reset` clears it, `/quit` or Ctrl-D ends, Ctrl-C stops the reply being written. The
oldest turns are dropped (said on stderr) when the history outgrows the model's context.
"""

from __future__ import annotations

from clm.config import run_cli
from clm.sampling import SamplingConfig


def main(cfg: SamplingConfig) -> list[str]:
    from transformers import TextStreamer

    from clm.sampling import complete, load_model

    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
    if cfg.chat:
        from clm.sampling import chat_loop, chat_once

        if cfg.prompt:
            return [chat_once(model, tokenizer, cfg)]
        return [m["content"] for m in chat_loop(model, tokenizer, cfg) if m["role"] == "assistant"]
    if cfg.stream:  # a streamer follows one sequence: prompts go one at a time
        texts = []
        for prompt in cfg.prompt:
            streamer = TextStreamer(tokenizer, skip_special_tokens=True) \
                if cfg.num_return_sequences == 1 else None
            batch = complete(model, tokenizer, [prompt], cfg, streamer=streamer)
            if streamer is None:
                print("\n".join(batch), flush=True)
            texts += batch
        return texts
    texts = complete(model, tokenizer, cfg.prompt, cfg)
    print(("\n" + "-" * 40 + "\n").join(texts))
    return texts


if __name__ == "__main__":
    run_cli(main, [SamplingConfig], description=__doc__.splitlines()[0])
