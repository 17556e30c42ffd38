"""Hang detection (clm/watchdog.py): the limit it applies, a stalled process ended with one line
and its stacks, and a 2-process run whose rank 1 stalls in its data read stopped within the
timeout with that rank named and the last checkpoint intact."""

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from clm import checkpoint as ckpt
from clm.watchdog import EXIT_CODE, MULTIPLE, Watchdog
from helpers import ROOT, toy_args


def test_the_limit_follows_the_median_step_with_a_floor():
    w = Watchdog(None, ".", 0, 1, floor=60.0)  # the default: no --step_timeout
    w.close()
    assert w.limit() == 60.0  # no step yet: compilation, warm-up
    for _ in range(4):  # the first step's time is not counted
        w.last -= 0.5
        w.beat()
    assert w.steps == 4 and len(w.durations) == 3
    assert w.limit() == 60.0  # 20 x 0.5 s is under the floor
    w.durations.extend([10.0] * 10)
    assert w.limit() == MULTIPLE * 10.0
    w.phase("evaluating", 5)  # not a step: the floor
    assert w.limit() == 60.0
    explicit = Watchdog(30, ".", 0, 1, floor=60)
    explicit.close()
    assert explicit.limit() == 60  # before the first step
    explicit.beat()
    assert explicit.limit() == 30
    explicit.phase("saving a checkpoint", 1)
    assert explicit.limit() == 60
    explicit.phase("reading data", 2)
    assert explicit.limit() == 30


def test_a_negative_step_timeout_is_refused():
    from clm.config import TrainingConfig

    with pytest.raises(ValueError, match=r"--step_timeout must be >= 0 seconds, 0 for off"):
        TrainingConfig(output_dir="x", step_timeout=-1)


def test_a_process_that_stops_progressing_is_ended_with_one_line_and_its_stacks(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from clm.watchdog import Watchdog
        w = Watchdog(1.0, {str(tmp_path)!r}, 3, 4, floor=1.0)
        w.beat()
        w.phase("reading data", 7)
        def stalled_read():
            time.sleep(60)
        stalled_read()
    """)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == EXIT_CODE
    assert time.monotonic() - start < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        r"error: rank 3 of 4 hung: no optimizer step completed in 1 s \(limit 1 s: "
        r"--step_timeout\); at step 7 it was reading data, in <string>:\d+ stalled_read\(\); "
        r"Python stacks of every thread in (.*)", lines[0]).group(1) == \
        str(tmp_path / "hang-rank3.txt"), lines
    stacks = (tmp_path / "hang-rank3.txt").read_text()
    assert stacks.startswith("rank 3 of 4: no progress for 1 s at step 7, reading data")
    assert "stalled_read" in stacks and "_watch" in stacks  # every thread's stack


@pytest.mark.slow
def test_a_rank_stalled_in_its_data_read_stops_the_run_with_that_rank_named(
        tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    out = tmp_path / "run"
    args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=12, save_steps=4,
                    eval_steps=0, num_samples=0, step_timeout=8, dataloader_num_workers=1)
    env = {**os.environ, "CLM_FAULTS": "hang:rank=1,step=6"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train_clm.py"), *args]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    took = time.monotonic() - start
    assert proc.returncode != 0
    err = proc.stderr
    hung = re.findall(r"^error: rank \d of 2 hung: .*$", err, re.M)
    # rank 1 says where it stalled; rank 0 that it waits for it in a collective
    rank1 = [line for line in hung if line.startswith("error: rank 1 of 2 hung")]
    assert len(rank1) == 1, err[-4000:]
    assert "(limit 8 s: --step_timeout); at step 6 it was reading data, in faults.py" in rank1[0]
    rank0 = [line for line in hung if line.startswith("error: rank 0 of 2 hung")]
    assert len(rank0) == 1, err[-4000:]
    assert "at step 6 it was in forward/backward, waiting in a collective (torch.distributed " \
           "all_reduce, from launch.py" in rank0[0], rank0
    # no traceback through the run's code (torchrun prints its own summary of the failure)
    assert 'train_clm.py", line' not in err, err[-4000:]
    assert "time.sleep" in (out / "hang-rank1.txt").read_text() or \
        "faults.py" in (out / "hang-rank1.txt").read_text()
    assert "all_reduce" in (out / "hang-rank0.txt").read_text()
    # stopped by the watchdog, long before the process group's 1800 s timeout
    assert took < 240, took
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-4"]
    assert ckpt.verify(out / "checkpoints" / "step-4") is None
