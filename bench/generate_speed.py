"""Sampling speed of generate.py: its own main, run twice on the same arguments, the second timed.

    python bench/generate_speed.py --model outputs/demo --prompt The --prompt A --max_new_tokens 64

Takes generate.py's options. The first run warms up (CUDA kernels, cuBLAS handles, the
allocator); in the second, each `model.generate` call of `clm.sampling.complete` is timed and the
positions it decoded are counted (rows x new positions: a row that ended early is padded to the
longest, which costs the same decode steps). Prints generate.py's completions, then one JSON line:
tokens/s, decoded positions, seconds, device.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str]) -> None:
    import torch

    import generate
    from clm import sampling
    from clm.config import run_cli

    stats = {"positions": 0, "seconds": 0.0, "device": None}
    complete = sampling.complete

    def timed(model, tokenizer, prompts, cfg, streamer=None):
        sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        call = model.generate

        def counted(**kwargs):
            out = call(**kwargs)
            stats["positions"] += out.shape[0] * (out.shape[1] - kwargs["input_ids"].shape[1])
            return out

        model.generate = counted
        sync()
        start = time.perf_counter()
        try:
            return complete(model, tokenizer, prompts, cfg, streamer=streamer)
        finally:
            sync()
            stats["seconds"] += time.perf_counter() - start
            stats["device"] = torch.cuda.get_device_name(model.device) \
                if model.device.type == "cuda" else "cpu"
            del model.generate

    run_cli(generate.main, [sampling.SamplingConfig], argv)  # warm-up (and the argument checks)
    sampling.complete = timed  # generate.main imports it from the module at each call
    try:
        texts = run_cli(generate.main, [sampling.SamplingConfig], argv)
    finally:
        sampling.complete = complete
    print(json.dumps({"bench": "generate", "completions": len(texts),
                      "decoded_positions": stats["positions"],
                      "seconds": round(stats["seconds"], 4),
                      "tokens_per_sec": round(stats["positions"] / stats["seconds"], 1)
                      if stats["seconds"] else None, "device": stats["device"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
