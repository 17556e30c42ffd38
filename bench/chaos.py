"""Random faults against a 2-process run under `torchrun --max-restarts`: does it recover, with
the weights of the run that had none, and how much work was redone or skipped?

    python bench/chaos.py --faults 24 --seed 0            # make chaos: ~7 minutes on 2 cores

One clean run first (2 gloo processes on CPU, a 2-layer model, STEPS steps, a checkpoint every
SAVE), then FAULTS runs of the same command, each with one fault drawn at random:
  kill      from outside: SIGKILL to a random rank once the run has logged a random step
            (torchrun restarts the job, which resumes from its newest checkpoint by itself)
  hang      a random rank sleeps in a random step's data read (CLM_FAULTS); the watchdog
            (--step_timeout) ends it, and torchrun restarts the job
  bad_step  a random step's loss is NaN on a random rank (CLM_FAULTS): the step is skipped
            on every rank and the run goes on
Each run's row: recovered (exit 0 and a final model), final weights bitwise equal to the clean
run's, steps redone (trained again after a restart) and steps skipped. Prints a markdown table
and a JSON summary; --results appends each row as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE = 24, 4
KINDS = ("kill", "hang", "bad_step")


def prepare(work: Path) -> list[str]:
    """A small corpus, its tokenizer and a 2-layer config; the training arguments over them."""
    from transformers import GPT2Config

    from clm.corpus import build_corpus

    if not (work / "tokenizer" / "tokenizer.json").is_file():
        build_corpus(work / "corpus", max_bytes=400_000)
        subprocess.run([sys.executable, "-m", "clm.tokenizer", "--dataset_name",
                        str(work / "corpus"), "--vocab_size", "512", "--output_dir",
                        str(work / "tokenizer")], check=True, capture_output=True, cwd=ROOT)
        GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(work / "config")
    return ["--dataset_name", str(work / "corpus"), "--tokenizer_name", str(work / "tokenizer"),
            "--config_name", str(work / "config"), "--block_size", "32",
            "--per_device_train_batch_size", "4", "--max_steps", str(STEPS),
            "--save_steps", str(SAVE), "--eval_steps", "0", "--logging_steps", "1",
            "--warmup_steps", "2", "--learning_rate", "3e-3", "--num_samples", "0",
            "--dataloader_num_workers", "1", "--seed", "0", "--step_timeout", "8"]


def launch(args: list[str], out: Path, faults: str = "", restarts: int = 3):
    env = {**os.environ, "CLM_FAULTS": faults, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", str(restarts), str(ROOT / "train_clm.py"), *args,
           "--output_dir", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)


def logged_steps(out: Path) -> list[int]:
    try:
        return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().split(
            "\n") if line.strip() and '"loss"' in line]
    except (OSError, ValueError):
        return []


def worker(proc, rank: int):
    """The training process of `rank` among torchrun's children."""
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "train_clm.py" in " ".join(child.cmdline()) and \
                    child.environ().get("RANK") == str(rank):
                return child
        except psutil.Error:
            continue
    return None


def weights(out: Path) -> dict | None:
    from safetensors.torch import load_file

    f = out / "model.safetensors"
    return load_file(f) if f.is_file() else None


def trial(i: int, kind: str, rng: random.Random, args: list[str], work: Path, clean) -> dict:
    out = work / f"run{i}"
    shutil.rmtree(out, ignore_errors=True)
    rank, step = rng.randrange(2), rng.randrange(SAVE + 1, STEPS)
    faults = {"kill": "", "hang": f"hang:rank={rank},step={step}",
              "bad_step": f"nan:rank={rank},step={step}"}[kind]
    start = time.monotonic()
    proc = launch(args, out, faults)
    reached = None
    if kind == "kill":  # from outside, once the run has logged `step`
        while proc.poll() is None and reached is None:
            steps = logged_steps(out)
            if steps and steps[-1] >= step:
                victim = worker(proc, rank)
                if victim is not None:
                    reached = steps[-1]
                    victim.send_signal(signal.SIGKILL)
            time.sleep(0.02)
    try:
        log, _ = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
    final = weights(out)
    resumed = [int(m) for m in re.findall(r"resuming from \S+/step-(\d+)", log)]
    if kind == "hang":
        reached = step - 1  # the last step done before the stall
    redone = sum(max(0, reached - r) for r in resumed) if reached is not None else 0
    skipped = sum(json.loads(line).get("skipped", 0) for line in
                  (out / "metrics.jsonl").read_text().splitlines()
                  if line.strip()) if (out / "metrics.jsonl").is_file() else None
    row = {"trial": i, "fault": kind, "rank": rank, "at_step": reached if kind == "kill" else step,
           "injected": kind != "kill" or reached is not None,
           "recovered": proc.returncode == 0 and final is not None,
           "restarts": len(resumed) + log.count("no checkpoint was written before the failure"),
           "identical": final is not None and final.keys() == clean.keys() and
           all((final[k] == clean[k]).all().item() for k in clean),
           "steps_redone": redone, "steps_skipped": skipped,
           "hang_reported": kind != "hang" or f"error: rank {rank} of 2 hung" in log,
           "seconds": round(time.monotonic() - start, 1)}
    if not row["recovered"]:
        row["log_tail"] = log[-1500:]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| fault | runs | injected | recovered | weights identical to the clean run | "
             "steps redone | steps skipped |", "|---|---|---|---|---|---|---|"]
    for kind in KINDS + ("all",):
        mine = [r for r in rows if kind in (r["fault"], "all")]
        if not mine:
            continue
        redone = [r["steps_redone"] for r in mine]
        skipped = [r["steps_skipped"] or 0 for r in mine]
        lines.append(f"| {kind} | {len(mine)} | {sum(r['injected'] for r in mine)} | "
                     f"{sum(r['recovered'] for r in mine)} | "
                     f"{sum(r['identical'] for r in mine)} | {sum(redone)} "
                     f"(max {max(redone)} per run) | {sum(skipped)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--faults", type=int, default=20, help="Faulty runs (one fault each).")
    p.add_argument("--seed", type=int, default=0, help="Draws the faults, ranks and steps.")
    p.add_argument("--work", default=None, help="Working folder (default: a temporary one).")
    p.add_argument("--results", default=None, help="Append each run's row (JSON lines) here.")
    a = p.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="clm-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    args = prepare(work)
    start = time.monotonic()
    proc = launch(args, work / "clean", restarts=0)
    log, _ = proc.communicate()
    clean = weights(work / "clean")
    if proc.returncode != 0 or clean is None:
        print(f"error: the clean run failed:\n{log[-3000:]}", file=sys.stderr)
        return 1
    rng = random.Random(a.seed)
    # every kind in turn, then at random: each one is drawn at least once
    kinds = [KINDS[i] if i < len(KINDS) else rng.choice(KINDS) for i in range(a.faults)]
    rows = []
    for i, kind in enumerate(kinds):
        row = trial(i, kind, rng, args, work, clean)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
        if a.results:
            with open(a.results, "a") as f:
                f.write(json.dumps({**row, "machine": f"{platform.machine()}, "
                                    f"{os.cpu_count()} cores"}) + "\n")
    print(f"\n{a.faults} faults against 2 processes (torchrun --max-restarts 3), {STEPS} steps, "
          f"a checkpoint every {SAVE}; {time.monotonic() - start:.0f} s\n")
    print(table(rows))
    ok = all(r["recovered"] and r["hang_reported"] for r in rows) and all(
        r["identical"] for r in rows if r["fault"] != "bad_step")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
