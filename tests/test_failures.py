"""Failed runs end: a one-line error and a non-zero exit, promptly, with DataLoader workers (which
ignore SIGTERM) and under torchrun, and the checkpoints saved before the failure intact."""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from clm import checkpoint as ckpt
from helpers import ROOT, metrics, toy_args

# A hang fails the test: a failed run on the toy model ends in ~15 s on 2 busy cores.
TIMEOUT = 120
NON_FINITE = "optimizer steps in a row had a non-finite loss or gradient"


def diverging(corpus_dir, tokenizer_dir, toy_config_dir, out, **kw):
    """A run whose first step is finite and whose next ones are not: Adam moves every weight by
    about the learning rate, 5e3 after one warmup step, and there is no clipping."""
    args = dict(learning_rate=1e4, min_lr=0, max_grad_norm=0, max_bad_steps=2, max_steps=20,
                warmup_steps=2, eval_steps=0, save_steps=1, num_samples=0)
    args.update(kw)
    return toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, **args)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.slow
def test_a_diverging_run_ends_with_one_line_and_exit_1(tmp_path, corpus_dir, tokenizer_dir,
                                                       toy_config_dir, workers):
    out = tmp_path / "run"
    argv = diverging(corpus_dir, tokenizer_dir, toy_config_dir, out,
                     dataloader_num_workers=workers)
    proc = subprocess.run([sys.executable, str(ROOT / "train_clm.py"), *argv],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"error: 2 {NON_FINITE}, the last at step 3 (lower --learning_rate, keep "
                    "--max_grad_norm clipping on, or check the data)"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # it really went non-finite: step 1 trained, steps 2 and 3 were skipped
    train = [r for r in metrics(out) if "loss" in r]
    assert [(r["step"], r.get("skipped")) for r in train] == [(1, None), (2, 1), (3, 1)]
    assert train[0]["loss"] is not None and train[1]["loss"] is None
    # the checkpoints saved before the stop are whole, their weights finite and untouched by
    # the skipped step; no final model is written
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-1", "step-2"]
    saved = [load_file(p / "model.safetensors") for p in ckpt.list_checkpoints(out)]
    for path in ckpt.list_checkpoints(out):
        assert ckpt.verify(path) is None
    assert all(torch.isfinite(w).all() for w in saved[1].values())
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])
    assert not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_every_rank_of_a_diverging_torchrun_exits_non_zero(tmp_path, corpus_dir, tokenizer_dir,
                                                           toy_config_dir):
    argv = diverging(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "run",
                     dataloader_num_workers=1, save_steps=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_clm.py"), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert proc.returncode != 0
    # both ranks decide on the same summed values, raise at the same step and say so
    # (counted in the whole text: two ranks' writes to the shared stderr may still interleave)
    errors = re.findall(r"error: (.*?), the last at step (\d+)", proc.stderr)
    assert errors == [(f"2 {NON_FINITE}", "3")] * 2, proc.stderr[-3000:]
    # torchrun's summary lists each rank that failed with its exit code (the first to exit
    # says 1; the agent may SIGTERM the other in its interpreter's teardown: -15)
    codes = [int(c) for c in re.findall(r"exitcode +: (-?\d+)", proc.stderr)]
    assert len(codes) == 2 and 0 not in codes, proc.stderr[-3000:]


def test_an_error_outside_the_loop_with_workers_running_exits(tmp_path, corpus_dir,
                                                              tokenizer_dir):
    """The safety net: a loader iterator nobody closes, kept alive by the traceback of an
    unexpected error, must not hold the interpreter's exit (multiprocessing joins its daemon
    children there after a SIGTERM that these workers ignore)."""
    code = textwrap.dedent(f"""
        import json, multiprocessing, sys
        from clm import data
        from clm.config import DataConfig

        cfg = DataConfig(dataset_name={str(corpus_dir)!r}, block_size=32,
                         dataloader_num_workers=2, shuffle_window=8)
        loader = data.train_loader(cfg, data.load_tokenizer({str(tokenizer_dir)!r}), 4, 0)
        batches = iter(loader)
        next(batches)
        print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
        raise RuntimeError("unexpected")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 1 and "RuntimeError: unexpected" in proc.stderr, proc.stderr
    assert "Exception ignored" not in proc.stderr, proc.stderr
    assert len(json.loads(proc.stdout)) == 2, "the workers were running"


def test_an_unexpected_error_mid_training_exits_non_zero(tmp_path, corpus_dir, tokenizer_dir,
                                                         toy_config_dir):
    """Any exception in the loop (an OOM, a bug) keeps its traceback but ends the process."""
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "run", max_steps=20,
                    eval_steps=0, num_samples=0, dataloader_num_workers=2)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import train_clm
        from clm import loop
        from clm.config import DataConfig, ModelConfig, TrainingConfig, run_cli

        real, calls = loop.forward_backward, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise MemoryError("injected at step 3")
            return real(*args, **kwargs)

        loop.forward_backward = failing
        run_cli(train_clm.main, [DataConfig, ModelConfig, TrainingConfig], {argv!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT)
    assert proc.returncode == 1 and "MemoryError: injected at step 3" in proc.stderr, \
        proc.stderr[-3000:]


def test_the_loop_stops_the_workers_on_its_way_out(tmp_path, corpus_dir, tokenizer_dir,
                                                   toy_config_dir, monkeypatch):
    """On an error in the loop the DataLoader's workers are gone by the time it reaches the
    caller, though its traceback (kept here) holds the loop's frame and the loader's."""
    import multiprocessing

    from clm import loop
    from helpers import run

    real, calls = loop.forward_backward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("injected at step 3")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "forward_backward", failing)
    before = set(multiprocessing.active_children())
    with pytest.raises(MemoryError) as failure:
        run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "run", max_steps=20,
                     eval_steps=0, num_samples=0, dataloader_num_workers=2))
    assert failure.traceback, "the frames are still referenced"
    left = [p for p in multiprocessing.active_children() if p not in before]
    assert left == [], "the DataLoader's workers outlived the loop"


@pytest.mark.parametrize("fault, reason", [
    # rank 0 writes the model and optimizer files: the kernel refuses them past 200 kB
    ("fsize:rank=0,step=6,bytes=200000", "File too large"),
    # rank 1's part of the save fails after its backend state was written
    ("readonly:rank=1,step=6", "Read-only file system")])
@pytest.mark.slow
def test_a_full_or_read_only_disk_mid_save_stops_every_rank_and_keeps_the_last_checkpoint(
        tmp_path, corpus_dir, tokenizer_dir, toy_config_dir, fault, reason):
    out = tmp_path / "run"
    args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=9, save_steps=3,
                    eval_steps=0, num_samples=0)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_clm.py")]
    env = {**os.environ, "CLM_FAULTS": fault}
    proc = subprocess.run(cmd + args, capture_output=True, text=True, timeout=TIMEOUT,
                          cwd=tmp_path, env=env)
    assert proc.returncode != 0
    # every rank stops with the same line (the failing rank's reason), no traceback
    lines = re.findall(r"^error: could not save checkpoint step-6: .*$", proc.stderr, re.M)
    rank = fault.split("rank=")[1][0]
    assert lines == [f"error: could not save checkpoint step-6: {reason} on rank {rank} (free "
                     "disk space or change --output_dir; step-3 is intact)"] * 2, \
        proc.stderr[-3000:]
    # no traceback through the run's code (torchrun prints its own summary of the failure)
    assert 'train_clm.py", line' not in proc.stderr, proc.stderr[-3000:]
    codes = [int(c) for c in re.findall(r"exitcode +: (-?\d+)", proc.stderr)]
    assert codes and 0 not in codes
    # the partial save is gone, step-3 is whole and a resume from it finishes the run
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-3"]
    assert not list((out / "checkpoints").glob(".step-*"))
    assert ckpt.verify(out / "checkpoints" / "step-3") is None
    env["CLM_FAULTS"] = ""
    proc = subprocess.run(cmd + args + ["--resume_from_checkpoint", "latest"],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step-3'} at step 3" in proc.stdout
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, 10))
