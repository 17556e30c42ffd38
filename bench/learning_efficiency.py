"""Held-out loss per token: optimizer and schedule recipes, and our data pipeline against a
random-crop reference sampler.

    python bench/learning_efficiency.py --compare recipes --sizes tiny   # the recipe table, demo corpus
    python bench/learning_efficiency.py --compare recipes --sizes tiny --corpus code   # a second corpus
    python bench/learning_efficiency.py                                  # sampler: demo corpus, 2 sizes x 3 seeds
    python bench/learning_efficiency.py --sizes tiny --seeds 1 --max_steps 50   # a quick look

--compare recipes: AdamW + cosine (the shipped recipe), AdamW + warmup-stable-decay, Muon +
cosine and Muon + WSD through train_clm.main, each recipe's rate tuned on a small grid (seed 0;
the grid and every loss are printed), its best rate run on --seeds seeds, then the best rate at
fractions of the tokens (seed 0, and every seed at the smallest fraction that reaches it) to
find the tokens each recipe needs to reach AdamW + cosine's final held-out loss (linear in
loss between the two fractions around it). --corpus code builds a second corpus offline: the
standard library's source code (clm.corpus.iter_source_documents), read with the demo
tokenizer. Every run is appended to --results (JSON lines) and read back on a rerun, so an
interrupted table continues where it stopped.

--compare sampler:
trains the same model with the same loop (train_clm.main), tokens and schedule twice per seed:
(a) on train_clm.py's own stream (streamed, packed, shuffled by --shuffle_buffer_blocks), and
(b) on nanoGPT-style random crops: the training documents (the same ones: the held-out carve is
excluded) flattened into one token array joined by EOS, each sequence cut at a uniformly random
offset. Both are scored on the same held-out blocks. Prints, per size, the mean and spread of
the final held-out loss of each, and the mean number of distinct documents per micro-batch of
our stream with and without the block shuffle. Any train_clm.py option can be passed after `--`
(e.g. `-- --train_files 'my/*.jsonl' --tokenizer_name my_tok`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import train_clm  # noqa: E402
from clm.config import DataConfig, ModelConfig, TrainingConfig, parse_config  # noqa: E402
from reference_gpt import RandomCrops  # noqa: E402

TYPES = [DataConfig, ModelConfig, TrainingConfig]
# name -> (n_layer, n_head, n_embd); block size and vocabulary come from the run's options
SIZES = {"tiny": (4, 4, 128), "4x256": (4, 4, 256), "6x384": (6, 6, 384)}


def training_tokens(data_cfg: DataConfig, tokenizer) -> np.ndarray:
    """Every training document (held-out carve excluded), in stored order, joined by EOS."""
    from clm import data

    source = data.open_source(data_cfg, "train")
    carve = data.heldout_source(data_cfg) == "carve"
    spec = data.StreamSpec(shuffle=False, infinite=False, window=data_cfg.shuffle_window,
                           select="train" if carve else "all",
                           heldout_percentage=data_cfg.validation_split_percentage)
    blocks = data.PackedBlocks(source, tokenizer, data_cfg.block_size, 1, spec,
                               data_cfg.text_column)
    return np.concatenate([tokens for _, tokens in blocks.documents(0)])


def documents_per_batch(data_cfg: DataConfig, tokenizer, batch_size: int, batches: int,
                        seed: int) -> float:
    """Mean distinct documents per micro-batch over the first `batches` of our stream."""
    from clm import data

    loader = data.train_loader(data_cfg, tokenizer, batch_size, seed)
    for i, _ in enumerate(loader, 1):
        if i == batches:
            break
    return loader.documents_seen / loader.batches


def write_model_config(folder: Path, shape, block_size: int) -> str:
    from transformers import GPT2Config

    n_layer, n_head, n_embd = shape
    GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=block_size,
               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
               activation_function="gelu_pytorch_tanh").save_pretrained(folder)
    return str(folder)


def spread(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
            "min": round(min(values), 4), "max": round(max(values), 4),
            "runs": [round(v, 4) for v in values]}


# --compare recipes: name -> (train_clm options, the option its grid varies, the grid)
RECIPES = {
    "adamw_cosine": ([], "learning_rate", (1e-3, 2e-3, 4e-3, 8e-3)),
    "adamw_wsd": (["--lr_scheduler_type", "warmup_stable_decay"], "learning_rate",
                  (1e-3, 2e-3, 4e-3, 8e-3)),
    "muon_cosine": (["--optim", "muon"], "muon_lr_ratio", (0.5, 1.0, 2.0, 4.0)),
    "muon_wsd": (["--optim", "muon", "--lr_scheduler_type", "warmup_stable_decay"],
                 "muon_lr_ratio", (0.5, 1.0, 2.0, 4.0)),
}
BASELINE = "adamw_cosine"
FRACTIONS = (0.35, 0.5, 0.7)
# the Muon options measured on top of the best Muon recipe (every seed)
ABLATIONS = {"split_qkv": ["--muon_split_qkv"],
             "no_nesterov": ["--muon_nesterov", "false"],
             "momentum_warmup_100": ["--muon_momentum_warmup_steps", "100"],
             "untied_zero_head": ["--untie_word_embeddings", "--zero_init_head"]}


def code_corpus(folder: Path) -> str:
    """The second corpus: the standard library's source, as parquet shards (built once)."""
    from clm.corpus import build_corpus, iter_source_documents

    if not folder.is_dir():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        build_corpus(partial, documents=iter_source_documents())
        partial.rename(folder)
    return str(folder)


class Runs:
    """train_clm.main runs by their options, appended to a JSON-lines file and read back."""

    def __init__(self, path: Path, work: Path, base: list[str], size: str):
        self.path, self.work, self.base = path, work, base
        # a run is known by its options, the model size standing for its temporary config
        self.key_base = [size if a.startswith(str(work)) else a for a in base]
        self.done = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                r = json.loads(line)
                self.done[r["key"]] = r["loss"]

    def loss(self, options: list[str], seed: int, steps: int) -> float:
        run = options + ["--seed", str(1000 + seed), "--max_steps", str(steps)]
        argv, key = self.base + run, " ".join(self.key_base + run)
        if key not in self.done:
            out = self.work / "run"
            cfgs = parse_config(TYPES, argv + ["--output_dir", str(out)])
            self.done[key] = train_clm.main(*cfgs)["final_eval_loss"]
            shutil.rmtree(out, ignore_errors=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "loss": self.done[key]}) + "\n")
        print(f"# {' '.join(options)} seed {seed} steps {steps}: {self.done[key]:.4f}",
              flush=True)
        return self.done[key]


def _setting(option: str, value: float, lr: float) -> list[str]:
    if option == "learning_rate":  # min_lr stays a tenth of the peak
        return ["--learning_rate", str(value), "--min_lr", str(value / 10)]
    return ["--learning_rate", str(lr), "--min_lr", str(lr / 10), f"--{option}", str(value)]


def tokens_to_reach(target: float, losses: dict[float, float]) -> float | None:
    """The fraction of the tokens at which the loss reaches `target`, linear between the
    measured fractions around it; None if even all the tokens do not."""
    points = sorted(losses.items())
    if points[0][1] <= target:
        return points[0][0]
    for (f0, l0), (f1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return None


def recipe_table(args, rest, work: Path) -> dict:
    """The --compare recipes table for one model size (args.sizes' first)."""
    size = args.sizes.split(",")[0]
    conf = write_model_config(work / f"config-{size}", SIZES[size], args.block_size)
    corpus = ["--dataset_name", code_corpus(Path(args.code_corpus_dir))] \
        if args.corpus == "code" else []
    base = ["--config", args.config, "--config_name", conf, "--block_size", str(args.block_size),
            "--per_device_train_batch_size", str(args.batch_size),
            "--gradient_accumulation_steps", "1", "--eval_steps", "0", "--save_steps", "0",
            "--num_samples", "0", "--logging_steps", "50", "--overwrite_output_dir",
            *corpus, *rest]
    runs = Runs(Path(args.results), work, base, size)
    seeds, steps = range(args.seeds), args.max_steps
    table, best_lr = {}, None
    names = args.recipes.split(",")
    unknown = set(names) - set(RECIPES)
    if unknown or names[0] != BASELINE:
        raise SystemExit(f"--recipes: {BASELINE} first, then any of {list(RECIPES)}")
    for name in names:
        options, option, grid = RECIPES[name]
        lr = best_lr or 2e-3
        by_value = {v: runs.loss(options + _setting(option, v, lr), 0, steps) for v in grid}
        value = min(by_value, key=by_value.get)
        chosen = options + _setting(option, value, lr)
        final = [runs.loss(chosen, seed, steps) for seed in seeds]
        if name == BASELINE:
            best_lr = value
        table[name] = {"options": chosen, "grid": {option: by_value}, "best": value,
                       "held_out_loss": spread(final), "losses_by_seed": final}
    target = table[BASELINE]["held_out_loss"]["mean"]
    for name, row in table.items():
        # seed-0 losses at fractions of the tokens, then every seed at the first that reaches
        # the target (its mean decides)
        curve = {1.0: row["held_out_loss"]["mean"]}
        for frac in FRACTIONS if name != BASELINE else ():
            curve[frac] = runs.loss(row["options"], 0, round(frac * steps))
        reached = [f for f in sorted(curve) if f < 1.0 and curve[f] <= target]
        if reached:
            f = reached[0]
            curve[f] = statistics.fmean(runs.loss(row["options"], seed, round(f * steps))
                                        for seed in seeds)
        row["loss_at_fraction"] = {str(k): round(v, 4) for k, v in sorted(curve.items())}
        row["tokens_to_baseline_loss"] = tokens_to_reach(target, curve)
    muon = min((n for n in table if n.startswith("muon")),
               key=lambda n: table[n]["held_out_loss"]["mean"])
    ablations = {}
    if args.ablations:
        for label, extra in ABLATIONS.items():
            ablations[label] = spread([runs.loss(table[muon]["options"] + extra, seed, steps)
                                       for seed in seeds])
    return {"size": size, "corpus": args.corpus, "target": target, "recipes": table,
            "best_muon_recipe": muon, "ablations": ablations}


def print_recipe_table(result: dict, tokens: int) -> None:
    print(f"\n{result['corpus']} corpus, {result['size']} model, {tokens:,} tokens a run; "
          f"target: {BASELINE}'s mean held-out loss {result['target']:.4f}")
    print(f"{'recipe':13} {'grid (seed 0)':44} {'held-out loss (mean ± std)':>27}  "
          f"{'tokens to target':>16}")
    for name, row in result["recipes"].items():
        (option, grid), = row["grid"].items()
        cells = ", ".join(f"{v:g}: {loss:.3f}" for v, loss in grid.items())
        loss = row["held_out_loss"]
        need = row["tokens_to_baseline_loss"]
        # reached at the smallest fraction measured: at most that
        first = min(row["loss_at_fraction"], key=float)
        at_most = need is not None and need < 1 and float(first) == need
        need = "> 1x" if need is None else f"{'<= ' if at_most else ''}{need:.2f}x"
        print(f"{name:13} {option + ' ' + cells:44} {loss['mean']:>18.4f} ± {loss['std']:.4f}  "
              f"{need:>16}")
    for label, loss in result["ablations"].items():
        print(f"{result['best_muon_recipe']} + {label}: {loss['mean']:.4f} ± {loss['std']:.4f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/demo_cpu.yaml"))
    p.add_argument("--sizes", default="tiny,4x256", help=f"comma list of {sorted(SIZES)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--max_steps", type=int, default=300)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--compare", choices=("sampler", "recipes"), default="sampler")
    p.add_argument("--corpus", choices=("demo", "code"), default="demo",
                   help="recipes: the --config's corpus, or the standard library's source")
    p.add_argument("--code_corpus_dir", default=str(ROOT / "data/bench_code_corpus"))
    p.add_argument("--results", default=None,
                   help="recipes: JSON lines of finished runs (default: bench-recipes-<corpus>-"
                        "<size>.jsonl in the working directory)")
    p.add_argument("--recipes", default=",".join(RECIPES),
                   help=f"recipes: which, {BASELINE} (the target) first")
    p.add_argument("--ablations", action="store_true",
                   help="recipes: also the Muon options on top of the best Muon recipe")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- then any train_clm.py options")
    args = p.parse_args()
    rest = [a for a in args.rest if a != "--"]
    work = Path(tempfile.mkdtemp(prefix="bench-learn-"))
    if args.compare == "recipes":
        args.results = args.results or \
            f"bench-recipes-{args.corpus}-{args.sizes.split(',')[0]}.jsonl"
        try:
            result = recipe_table(args, rest, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        tokens = args.max_steps * args.batch_size * args.block_size
        print(json.dumps({"bench": "learning_efficiency", "compare": "recipes",
                          "tokens_per_run": tokens, "steps": args.max_steps,
                          "batch_size": args.batch_size, "block_size": args.block_size,
                          "seeds": args.seeds, "extra_options": rest, **result}, indent=1))
        print_recipe_table(result, tokens)
        return
    results = {}
    try:
        for size in args.sizes.split(","):
            shape = SIZES[size]
            conf = write_model_config(work / f"config-{size}", shape, args.block_size)
            losses = {"ours": [], "random_crops": []}
            for seed in range(args.seeds):
                argv = ["--config", args.config, "--config_name", conf,
                        "--block_size", str(args.block_size), "--max_steps", str(args.max_steps),
                        "--per_device_train_batch_size", str(args.batch_size),
                        "--gradient_accumulation_steps", "1", "--eval_steps", "0",
                        "--save_steps", "0", "--num_samples", "0", "--logging_steps", "50",
                        "--seed", str(1000 + seed), "--overwrite_output_dir", *rest]
                for kind in losses:
                    out = work / f"{size}-{seed}-{kind}"
                    cfgs = parse_config(TYPES, argv + ["--output_dir", str(out)])
                    batches = None
                    if kind == "random_crops":
                        from clm.data import load_tokenizer

                        data_cfg, _, train_cfg = cfgs
                        tok = load_tokenizer(data_cfg.tokenizer_name)
                        batches = RandomCrops(training_tokens(data_cfg, tok), args.block_size,
                                              train_cfg.per_device_train_batch_size,
                                              train_cfg.seed)
                    run = train_clm.main(*cfgs, batches=batches)
                    losses[kind].append(run["final_eval_loss"])
                    print(f"# {size} seed {seed} {kind}: held-out loss "
                          f"{run['final_eval_loss']:.4f}", flush=True)
                    shutil.rmtree(out, ignore_errors=True)
            results[size] = {k: spread(v) for k, v in losses.items()}
            results[size]["ours_minus_reference"] = round(
                results[size]["ours"]["mean"] - results[size]["random_crops"]["mean"], 4)
        data_cfg, _, train_cfg = parse_config(TYPES, ["--config", args.config, "--block_size",
                                                      str(args.block_size), "--output_dir",
                                                      str(work / "docs"), *rest])
        from clm.data import load_tokenizer

        tok = load_tokenizer(data_cfg.tokenizer_name)
        docs = {}
        for blocks in (1, data_cfg.shuffle_buffer_blocks):
            data_cfg.shuffle_buffer_blocks = blocks
            docs[f"shuffle_buffer_blocks={blocks}"] = round(documents_per_batch(
                data_cfg, tok, args.batch_size, args.max_steps, train_cfg.seed), 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"bench": "learning_efficiency", "config": args.config,
                      "tokens_per_run": args.max_steps * args.batch_size * args.block_size,
                      "steps": args.max_steps, "batch_size": args.batch_size,
                      "block_size": args.block_size, "extra_options": rest,
                      "held_out_loss": results,
                      "distinct_documents_per_micro_batch": docs}, indent=1))
    print(f"\n{'size':8} {'ours (mean ± std)':>22} {'random crops (mean ± std)':>28}  diff")
    for size, r in results.items():
        o, c = r["ours"], r["random_crops"]
        print(f"{size:8} {o['mean']:>13.4f} ± {o['std']:.4f} {c['mean']:>19.4f} ± {c['std']:.4f}"
              f"  {r['ours_minus_reference']:+.4f}")


if __name__ == "__main__":
    main()
