"""Sample text from a model this project trained (or any Hugging Face causal LM).

    python generate.py --model outputs/demo --prompt "The" --max_new_tokens 40
    python generate.py --model outputs/demo/checkpoints/step-100 --prompt "A" --prompt "The" --do_sample false
    python generate.py --model gpt2 --prompt "Hello" --stream
    python generate.py --model outputs/sft_demo/checkpoints/step-100 --prompt "def f(x):"

A LoRA run's checkpoints and its `--merge_adapters false` final folder hold peft adapters: they
are merged into the base model their adapter_config.json names (which must still be there).

Completions (prompt included) go to stdout, separated by a line of dashes when there are
several; `--seed` makes them reproducible.
"""

from __future__ import annotations

from clm.config import run_cli
from clm.sampling import SamplingConfig


def main(cfg: SamplingConfig) -> list[str]:
    from transformers import TextStreamer

    from clm.sampling import complete, load_model

    model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
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
