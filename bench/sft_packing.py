"""Finetuning throughput with and without --packing, on the demo records (or any SFT config).

    python bench/sft_packing.py                              # configs/sft_demo.yaml, 30 steps each
    python bench/sft_packing.py --config my_sft.yaml --steps 50

Runs finetune/run_sft.py's real main twice, the same options but --packing false / true, and
prints one JSON object: for each, the share of padding in the micro-batches of a whole epoch
(pad tokens / tokens the model computes), examples per optimizer step, real (non-pad) tokens/s
and examples/s over the timed steps (the first `--warmup` excluded), and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "finetune")]
from clm.metrics import read_metrics  # noqa: E402


def padding_share(loader) -> tuple[float, float]:
    """(pad tokens / computed tokens, examples per micro-batch) over one epoch of `loader`."""
    pads = total = examples = 0
    batches = loader.batches_per_epoch
    it = iter(loader)
    for _ in range(batches):
        batch = next(it)
        pads += int((batch["attention_mask"] == 0).sum())
        total += batch["attention_mask"].numel()
        if "position_ids" in batch:
            examples += int(((batch["position_ids"] == 0) & (batch["attention_mask"] == 1)).sum())
        else:
            examples += batch["input_ids"].shape[0]
    return pads / total, examples / batches


def run(config: str, packing: bool, steps: int, warmup: int, work: Path) -> dict:
    import run_sft
    from clm import sft
    from clm.config import ModelConfig, TrainingConfig, parse_config
    from clm.task_eval import GenerationEvalConfig

    out = work / f"packing-{packing}"
    argv = ["--config", config, "--output_dir", str(out), "--overwrite_output_dir",
            "--packing", str(packing).lower(), "--max_steps", str(warmup + steps),
            "--logging_steps", "1", "--eval_steps", "0", "--save_steps", "0",
            "--num_samples", "0", "--eval_metrics", ""]
    types = [sft.SFTDataConfig, ModelConfig, TrainingConfig, sft.LoraArgs, GenerationEvalConfig]
    cfgs = parse_config(types, argv)
    seen = {}
    real_loader = sft.ExampleLoader

    class Spy(real_loader):  # the run's own loader, measured over an epoch before training
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            probe = real_loader(*a, **kw)
            seen["pad"], seen["examples_per_batch"] = padding_share(probe)

    sft.ExampleLoader = Spy
    start = time.perf_counter()
    try:
        run_sft.main(*cfgs)
    finally:
        sft.ExampleLoader = real_loader
    wall = time.perf_counter() - start
    train = read_metrics(out, "train")
    base, last = train[warmup - 1], train[-1]
    seconds = last["elapsed_s"] - base["elapsed_s"]
    tokens = last["tokens"] - base["tokens"]
    per_step = seen["examples_per_batch"] * cfgs[2].gradient_accumulation_steps
    return {"packing": packing, "padding_share": round(seen["pad"], 4),
            "examples_per_step": round(per_step, 1),
            "real_tokens_per_sec": round(tokens / seconds, 1),
            "examples_per_sec": round(per_step * steps / seconds, 1),
            "final_loss": last["loss"], "wall_s": round(wall, 1)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/sft_demo.yaml"))
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    args = p.parse_args()
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-sft-") as work:
        results = [run(args.config, packing, args.steps, args.warmup, Path(work))
                   for packing in (False, True)]
    print(json.dumps({"bench": "sft_packing", "config": args.config,
                      "device": f"cpu ({torch.get_num_threads()} threads)"
                      if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                      "runs": results,
                      "examples_per_sec_ratio": round(results[1]["examples_per_sec"] /
                                                      results[0]["examples_per_sec"], 3)},
                     indent=1))


if __name__ == "__main__":
    main()
