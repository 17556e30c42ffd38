"""Runs that survive a rank's death: torchrun's `--max-restarts` restarts the job and the restart
goes on from the newest complete checkpoint with no flag added (DDP, FSDP2, ZeRO-2), ending with
the weights of an uninterrupted run; what counts as "this launch"; `--resume_from_checkpoint
auto`; and the faults the tests and bench/chaos.py inject (clm/faults.py)."""

import json
import os
import re
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from clm import checkpoint as ckpt, faults, outputs, session
from clm.config import TrainingConfig
from clm.errors import UsageError
from clm.faults import parse
from clm.parallel import Topology
from clm.parallel.launch import elastic_job
from helpers import ROOT, metrics, read_plans, toy_args, world_of

BACKENDS = {"ddp": [], "fsdp": ["--fsdp", "full_shard"],
            "zero2": ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")],
            # the settings users run: bf16 autocast, compiled, a DataLoader worker per rank
            "ddp_bf16_compile_workers": ["--mixed_precision", "bf16", "--torch_compile", "true",
                                         "--dataloader_num_workers", "1"]}


def torchrun(cwd, args, max_restarts=0, faults="", nproc=2, timeout=600):
    """train_clm.py under `torchrun --standalone --max-restarts N` with CLM_FAULTS=`faults`;
    returns the finished process (its exit code is the caller's to check)."""
    env = {**os.environ, "CLM_FAULTS": faults}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "--max-restarts", str(max_restarts), str(ROOT / "train_clm.py"),
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def train_steps(out):
    return [(r["step"], r["loss"]) for r in metrics(out) if "loss" in r]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.slow
def test_a_rank_killed_after_a_checkpoint_restarts_the_job_exactly(
        tmp_path, corpus_dir, tokenizer_dir, toy_config_dir, backend):
    """Rank 1 is SIGKILLed after step 5 (its newest checkpoint: step 3). torchrun restarts both
    ranks; they resume from step-3 by themselves, redo steps 4-5 and finish with the weights
    and every logged loss of the run that was never interrupted."""
    kw = dict(max_steps=9, save_steps=3, eval_steps=0, num_samples=1, shuffle_window=32,
              shuffle_buffer_blocks=16)
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    done = torchrun(tmp_path, toy_args(corpus_dir, tokenizer_dir, toy_config_dir, clean, **kw)
                    + BACKENDS[backend])
    assert done.returncode == 0, done.stderr[-4000:]
    proc = torchrun(tmp_path, toy_args(corpus_dir, tokenizer_dir, toy_config_dir, killed, **kw)
                    + BACKENDS[backend], max_restarts=1, faults="kill:rank=1,step=5")
    assert proc.returncode == 0, proc.stderr[-4000:]
    log = proc.stdout + proc.stderr
    assert "Signals.SIGKILL" in log or "signal 9" in log.lower() or "-9" in log, log[-3000:]
    resumed = re.findall(r"a restart of this launch \(torchrun --max-restarts, run id \S+\): "
                         r"resuming from (\S+)", log)
    assert resumed == [str(killed / "checkpoints" / "step-3")], log[-3000:]
    assert world_of(killed) == (2, 2)
    # every step logged once, with the clean run's losses: steps 4 and 5 were redone
    assert train_steps(killed) == train_steps(clean)
    assert [s for s, _ in train_steps(killed)] == list(range(1, 10))
    a, b = load_file(clean / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "weights differ"
    # the ranks read disjoint data
    states = [json.loads((killed / "checkpoints" / "step-9" / "state" /
                          f"data_rank{r}.json").read_text()) for r in range(2)]
    items = read_plans(corpus_dir, states)
    assert items[0] and items[1] and not items[0] & items[1]


@pytest.mark.slow
def test_a_restart_never_takes_over_another_launchs_folder(tmp_path, corpus_dir, tokenizer_dir,
                                                          toy_config_dir):
    """A fresh launch into a non-empty folder is refused, and so is each of its restarts: the
    folder's checkpoints belong to another launch."""
    out = tmp_path / "run"
    args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=3, save_steps=3,
                    eval_steps=0, num_samples=0)
    assert torchrun(tmp_path, args).returncode == 0
    before = (out / "model.safetensors").read_bytes()
    proc = torchrun(tmp_path, args, max_restarts=1)
    assert proc.returncode != 0
    refusal = f"error: --output_dir {out} is not empty (pass --overwrite_output_dir"
    assert proc.stderr.count(refusal) == 4, proc.stderr[-3000:]  # 2 ranks x 2 attempts
    assert "resuming" not in proc.stdout
    assert (out / "model.safetensors").read_bytes() == before


# ----------------------------------------------------------------------------- which launch


def fake_checkpoint(out, step, world=2):
    path = out / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    ckpt._write_json(path / "trainer_state.json",
                     {"fingerprint": {"world_size": world, "global_batch": 8, "block_size": 32},
                      "loop": {"step": step}})
    ckpt._write_json(path / ckpt.MANIFEST, {"step": step, "backend": "ddp", "files": {
        "trainer_state.json": (path / "trainer_state.json").stat().st_size}})
    return path


def restarted(restart, job="job-1", world=2, rank=0):
    return Topology(rank=rank, world_size=world, local_world_size=world, restart=restart, job=job)


def cfg_for(out, **kw):
    return TrainingConfig(output_dir=str(out), per_device_train_batch_size=4, **kw)


def test_a_restart_of_the_launch_that_wrote_the_folder_resumes_from_its_newest_checkpoint(
        tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    outputs.mark_launch(out, restarted(0))
    lines = []
    # before any checkpoint: the restart starts again over its own files
    assert session.check_output(cfg_for(out), restarted(1), log=lines.append) is None
    assert lines == ["a restart of this launch (torchrun --max-restarts, run id job-1): no "
                     "checkpoint was written before the failure; starting again"]
    fake_checkpoint(out, 3)
    newest = fake_checkpoint(out, 6)
    (out / "checkpoints" / ".step-9.tmp").mkdir()  # a save cut short is not a checkpoint
    # whatever --resume_from_checkpoint said at the first launch
    for spec in (None, "latest", "auto", str(out / "checkpoints" / "step-3")):
        assert session.check_output(cfg_for(out, resume_from_checkpoint=spec),
                                    restarted(2), log=lines.append) == newest
    # a damaged newest one is passed over
    (newest / ckpt.MANIFEST).unlink()
    assert session.check_output(cfg_for(out), restarted(1), log=print).name == "step-3"


def test_a_restart_of_another_launch_and_a_first_launch_are_guarded_as_before(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fake_checkpoint(out, 3)
    outputs.mark_launch(out, restarted(0, job="someone-else"))
    for topology in (restarted(1), restarted(0), Topology()):
        with pytest.raises(UsageError, match="is not empty"):
            session.check_output(cfg_for(out), topology)
    # `auto`: the newest complete checkpoint if there is one...
    assert session.check_output(cfg_for(out, resume_from_checkpoint="auto"),
                                Topology(world_size=2, local_world_size=2)).name == "step-3"
    # ... else a new run, into an empty folder only
    empty = tmp_path / "empty"
    assert session.check_output(cfg_for(empty, resume_from_checkpoint="auto"), Topology()) is None
    (empty / "x").mkdir(parents=True)
    with pytest.raises(UsageError, match="is not empty"):
        session.check_output(cfg_for(empty, resume_from_checkpoint="auto"), Topology())


def test_the_launch_is_named_by_torchruns_agent(tmp_path):
    assert elastic_job({}) is None  # plain python: no agent, no restarts
    assert elastic_job({"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_RUN_ID": "42"}) == "42"
    # a static rendezvous has no id: the agent (this process's parent on its node) names it
    job = elastic_job({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_RUN_ID": "none"})
    assert job.endswith(f":{os.getppid()}")
    t = Topology.from_launcher({"RANK": "1", "WORLD_SIZE": "2", "TORCHELASTIC_RESTART_COUNT": "3",
                                "TORCHELASTIC_RUN_ID": "abc"})
    assert (t.restart, t.job) == (3, "abc")
    # the mark is hidden from the Hub and a run with no agent removes it
    outputs.mark_launch(tmp_path, t)
    assert outputs.launched_by(tmp_path) == "abc"
    assert outputs.LAUNCH_FILE.startswith(".")
    outputs.mark_launch(tmp_path, Topology())
    assert outputs.launched_by(tmp_path) is None


def test_fault_specs_are_read_or_refused(tmp_path, monkeypatch):
    kill, hang = parse("kill:rank=1,step=5; hang:step=7,seconds=3")
    assert (kill.kind, kill.rank, kill.step, kill.index) == ("kill", 1, 5, 0)
    assert (hang.kind, hang.rank, hang.step, hang.args, hang.index) == \
        ("hang", None, 7, {"seconds": 3}, 1)
    for bad, why in [("explode:step=1", "unknown fault 'explode'"),
                     ("kill:rank=1", "names no step"), ("kill:step=x", "cannot read")]:
        with pytest.raises(UsageError, match=why):
            parse(bad)
    # a fault fires once per output folder and rank, however often its step comes round
    monkeypatch.setenv("CLM_FAULTS", "readonly:step=2")
    faults.reload()
    faults.configure(tmp_path, rank=0)
    try:
        faults.at("save", 2)  # another point: nothing
        with pytest.raises(OSError, match="Read-only file system"):
            faults.at("save_written", 2)
        faults.at("save_written", 2)  # a restart redoing step 2
        assert (tmp_path / faults.FIRED).read_text() == "0@0\n"
    finally:
        monkeypatch.delenv("CLM_FAULTS")
        faults.reload()
        faults.configure(None)
