"""Checkpoints and exact resume: SIGKILL, SIGTERM, twice, damaged, rotation, refusals, full disk, DDP."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clm import checkpoint as ckpt
from helpers import (ROOT, assert_folder_serves_users, assert_same_training, metrics,
                     reset_accelerate, run, toy_args)


def losses(out):
    return {r["step"]: r["loss"] for r in metrics(out) if "loss" in r}


def weights(path):
    return load_file(Path(path) / "model.safetensors")


def assert_same_run(a, b, max_steps=30):
    assert_same_training(a, b, max_steps=max_steps, warmup_steps=2, learning_rate=3e-3,
                         min_lr=3e-4)


def script(args, launcher=()):
    return [sys.executable, *launcher, str(ROOT / "train_clm.py"), *args]


def wait_for(predicate, proc, timeout=120):
    start = time.time()
    while not predicate():
        assert proc.poll() is None, f"process ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def args_for(corpus_dir, tokenizer_dir, toy_config_dir):
    def make(out, **kw):
        base = dict(max_steps=30, eval_steps=10, logging_steps=1, save_steps=4,
                    dataloader_num_workers=2, shuffle_window=8, num_samples=0)
        base.update(kw)
        return toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, **base)
    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args_for):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = subprocess.run(script(args_for(out)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_twice(tmp_path, args_for, reference):
    out = tmp_path / "run"
    for kill_after in (4, 12):  # killed twice, resumed twice
        extra = ["--resume_from_checkpoint", "latest"] if kill_after > 4 else []
        proc = subprocess.Popen(script(args_for(out) + extra), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        target = ckpt.checkpoint_root(out) / f"step-{kill_after}"
        wait_for(target.is_dir, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (out / "model.safetensors").exists(), "killed before the end"
        assert ckpt.verify(target) is None
    proc = subprocess.run(script(args_for(out) + ["--resume_from_checkpoint", "latest"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert_same_run(out, reference)
    # each checkpoint holds a plain HF model folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt.checkpoint_root(out) / "step-12")


@pytest.mark.slow
def test_a_muon_run_killed_after_a_checkpoint_resumes_exactly(tmp_path, args_for):
    """SIGKILL under --optim muon: Muon's momentum (and its warmup, a function of the step)
    and AdamW's moments come back from the checkpoint, so the run ends as one never killed."""
    muon = ["--optim", "muon", "--muon_momentum_warmup_steps", "6"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    proc = subprocess.run(script(args_for(ref, max_steps=12) + muon), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.Popen(script(args_for(out, max_steps=12) + muon), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for((ckpt.checkpoint_root(out) / "step-4").is_dir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists(), "killed before the end"
    proc = subprocess.run(script(args_for(out, max_steps=12) + muon +
                                 ["--resume_from_checkpoint", "latest"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert_same_run(out, ref, max_steps=12)


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_continues_identically(tmp_path, args_for, reference):
    out = tmp_path / "run"
    # its own process group, signalled whole, as Slurm and Ctrl-C do: the 2 DataLoader workers
    # get SIGTERM too, and must leave the stop to the main process
    proc = subprocess.Popen(script(args_for(out, save_steps=0)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 5, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    step = max(losses(out))
    assert 5 <= step < 30 and f"stopped by SIGTERM at step {step}" in stdout
    assert "--resume_from_checkpoint latest" in stdout
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"step-{step}"]
    proc = subprocess.run(script(args_for(out, save_steps=0) + ["--resume_from_checkpoint",
                                                                "latest"]),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, reference)


def test_every_folder_it_writes_serves_generation_and_downstream_tools(tmp_path, args_for):
    """The final folder, a checkpoint's HF folder and an export of its state: KV cache on in
    config.json (the training forward still runs without one), n_ctx, a tokenizer that
    transformers 4 loads, truncating to the model's 64 positions, with a pad token."""
    from clm import export

    out = tmp_path / "run"
    run(args_for(out, max_steps=4, save_steps=4, dataloader_num_workers=0))
    folders = [out, ckpt.checkpoint_root(out) / "step-4",
               export.export(ckpt.checkpoint_root(out) / "step-4", tmp_path / "exported")]
    for folder in folders:
        assert_folder_serves_users(folder)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["model_max_length"] == 64 and tok_cfg["pad_token"] == "<|endoftext|>"


def test_damaged_newest_falls_back_and_rotation_keeps_newest(tmp_path, args_for, capsys):
    out = tmp_path / "run"
    run(args_for(out, max_steps=12, dataloader_num_workers=0, save_total_limit=2))
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-8", "step-12"]
    optimizer = next((ckpt.checkpoint_root(out) / "step-12" / "state").glob("optimizer*"))
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # a damaged newest checkpoint
    assert ckpt.resolve_resume(out, "latest").name == "step-8"
    assert "step-12 is damaged" in capsys.readouterr().out
    # rotation counts only complete checkpoints and never removes the newest complete one
    assert ckpt.rotate(out, 1) == []
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-8", "step-12"]
    partial = ckpt.checkpoint_root(out) / "step-16"
    partial.mkdir()
    assert ckpt.resolve_resume(out, "latest").name == "step-8"


def test_resume_refusals_are_one_line_errors(tmp_path, args_for, capsys, corpus_dir,
                                             tokenizer_dir):
    out = tmp_path / "run"
    run(args_for(out, max_steps=4, dataloader_num_workers=0))
    capsys.readouterr()
    cases = [({"block_size": 16}, "block_size=32 but this run has block_size=16"),
             ({"per_device_train_batch_size": 2}, "global_batch=4 but this run has global_batch=2"),
             ({"max_steps": 8, "config_name": None}, "n_layer=2 but this run has n_layer=4"),
             # the data's identity: another held-out share would move trained-on documents
             # into the held-out set; other shuffle settings another order
             ({"validation_split_percentage": 20},
              "data.validation_split_percentage=10.0 but this run has "
              "data.validation_split_percentage=20.0 (use the same --validation_split_percentage"),
             ({"shuffle_buffer_blocks": 64}, "data.shuffle_buffer_blocks=8192 but"),
             ({"text_column": "id"}, "data.text_column=text but this run has data.text_column=id"),
             # the optimizer and what orders the data are options like any other
             ({"weight_decay": 0.0}, "training.weight_decay=0.1 but this run has "
              "training.weight_decay=0.0 (use the same --weight_decay, or start a new run"),
             ({"adam_beta2": 0.99}, "training.adam_beta2=0.95 but"),
             ({"seed": 7}, "training.seed=0 but this run has training.seed=7")]
    for overrides, message in cases:
        kw = dict(max_steps=8, dataloader_num_workers=0)
        kw.update(overrides)
        argv = args_for(out, **kw) + ["--resume_from_checkpoint", "latest"]
        if overrides.get("config_name", "") is None:
            i = argv.index("--config_name")
            del argv[i:i + 2]
            argv += ["--model_preset", "tiny", "--block_size", "32"]
        with pytest.raises(SystemExit) as e:
            run(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and message in err[0], (message, err)
    state_file = ckpt.checkpoint_root(out) / "step-4" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    # another number of processes is resumed (tests/test_reshard.py), but only with the
    # checkpoint's global batch made exactly: 6 sequences from 1 process x 4 cannot be
    saved["fingerprint"].update(world_size=2, global_batch=6)
    state_file.write_text(json.dumps(saved))
    with pytest.raises(SystemExit):
        run(args_for(out, max_steps=8, dataloader_num_workers=0) +
            ["--resume_from_checkpoint", str(state_file.parent)])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "global batch of 6 sequences is not a multiple of " \
        "--per_device_train_batch_size 4 x 1 processes (pass --per_device_train_batch_size " \
        "2 or 3 or 6)" in err[0], err
    with pytest.raises(SystemExit):
        run(args_for(tmp_path / "empty", max_steps=8) + ["--resume_from_checkpoint", "latest"])
    assert "no complete checkpoint" in capsys.readouterr().err


def test_fingerprint_covers_every_option_but_the_listed_ones():
    """The fingerprint is derived from the config dataclasses: every field is in it unless
    MAY_CHANGE names it, so a field added to a config is covered without touching the
    checkpoint code; MAY_CHANGE names only real options; the optimizer's settings are in."""
    import dataclasses

    from clm.config import DataConfig, ModelConfig, TrainingConfig
    from clm.evaluate import BenchmarkEvalConfig
    from clm.sft import LoraArgs, SFTDataConfig

    configs = {"data": DataConfig(), "model": ModelConfig(),
               "training": TrainingConfig(output_dir="x"), "lora": LoraArgs(),
               "evaluation": BenchmarkEvalConfig()}
    identity = ckpt.config_identity(configs)
    expected = {f"{section}.{f.name}" for section, cfg in configs.items()
                if section != "evaluation" for f in dataclasses.fields(cfg)
                if f.name not in ckpt.MAY_CHANGE}
    assert set(identity) == expected
    assert {"training.optim", "training.weight_decay", "training.adam_beta1",
            "training.adam_beta2", "training.adam_epsilon", "training.max_grad_norm",
            "training.seed", "training.mixed_precision", "training.deepspeed", "training.fsdp",
            "data.shuffle_window", "model.model_name_or_path", "lora.lora_r"} <= set(identity)
    assert not {"training.max_steps", "training.learning_rate", "training.output_dir",
                "data.dataloader_num_workers", "training.per_device_train_batch_size"} \
        & set(identity)
    every = {f.name for cfg in (*configs.values(), SFTDataConfig(train_files=["x"]))
             for f in dataclasses.fields(cfg)}
    assert ckpt.MAY_CHANGE <= every, ckpt.MAY_CHANGE - every

    @dataclasses.dataclass
    class Extended(TrainingConfig):
        new_option: int = 3

    extended = ckpt.config_identity({"training": Extended(output_dir="x")})
    assert extended["training.new_option"] == 3


def test_full_disk_during_save_keeps_previous_checkpoint(tmp_path, args_for, capsys,
                                                         monkeypatch):
    real = ckpt.save_model_folder
    calls = {"n": 0}

    def flaky(model, tokenizer, dest):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(model, tokenizer, dest)

    monkeypatch.setattr(ckpt, "save_model_folder", flaky)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(args_for(out, max_steps=12, dataloader_num_workers=0))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1, "one error line (after the progress bar)"
    assert "could not save checkpoint step-8: No space left on device" in err[0]
    assert "step-4 is intact" in err[0]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-4"]
    assert ckpt.verify(ckpt.checkpoint_root(out) / "step-4") is None
    assert not list(ckpt.checkpoint_root(out).glob(".*tmp"))


def test_rolling_back_starts_a_new_future(tmp_path, args_for, capsys):
    out = tmp_path / "run"
    run(args_for(out, max_steps=12, dataloader_num_workers=0, save_total_limit=2))
    root = ckpt.checkpoint_root(out)
    abandoned = weights(root / "step-12")
    capsys.readouterr()
    # back past a "loss spike": from step-8, with a lower learning rate, on to step 16
    reset_accelerate()
    run(args_for(out, max_steps=16, dataloader_num_workers=0, save_total_limit=2,
                 learning_rate=1e-3) + ["--resume_from_checkpoint", str(root / "step-8")])
    printed = capsys.readouterr().out
    assert "moved the abandoned run's newer checkpoints (step-12) to" in printed
    aside = root / "abandoned-after-step-8"
    assert [p.name for p in aside.iterdir()] == ["step-12"], "moved aside, not deleted"
    assert all(torch.equal(a, b) for a, b in zip(weights(aside / "step-12").values(),
                                                 abandoned.values()))
    # the new run's saves were written (not skipped as "already there") and rotation kept them
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-12", "step-16"]
    new = weights(root / "step-12")
    assert not all(torch.equal(new[k], abandoned[k]) for k in new), "the new future's weights"
    assert ckpt.resolve_resume(out, "latest").name == "step-16"
    state = json.loads((root / "step-12" / "trainer_state.json").read_text())
    assert state["run_config"]["training"]["learning_rate"] == 1e-3
    assert sorted(losses(out)) == list(range(1, 17)), "metrics go on from step 8"


def test_resume_into_another_output_dir_and_leftovers(tmp_path, args_for, capsys):
    first = tmp_path / "first"
    run(args_for(first, max_steps=4, dataloader_num_workers=0))
    before = sorted(p.name for p in first.rglob("*"))
    leftover = ckpt.checkpoint_root(first) / ".step-6.tmp"  # a run killed while saving step 6
    (leftover / "state").mkdir(parents=True)
    capsys.readouterr()
    second = tmp_path / "second"
    reset_accelerate()
    run(args_for(second, max_steps=8, dataloader_num_workers=0) +
        ["--resume_from_checkpoint", str(ckpt.checkpoint_root(first) / "step-4")])
    assert "resumed from" in capsys.readouterr().out
    assert (second / "model.safetensors").is_file()
    assert sorted(losses(second)) == list(range(1, 9)), "the first run's metrics carried over"
    assert [p.name for p in ckpt.list_checkpoints(second)] == ["step-8"]
    assert leftover.is_dir(), "the other run's folder is not touched"
    leftover.rename(ckpt.checkpoint_root(second) / ".step-6.tmp")
    assert sorted(p.name for p in first.rglob("*")) == before
    # the leftover of a save cut short is removed at the next start, with a message
    reset_accelerate()
    run(args_for(second, max_steps=9, dataloader_num_workers=0) +
        ["--resume_from_checkpoint", "latest"])
    assert "removed .step-6.tmp, a checkpoint whose save was interrupted" in \
        capsys.readouterr().out
    assert not list(ckpt.checkpoint_root(second).glob(".*tmp"))
    # another run's non-empty folder is refused, as for a new run
    with pytest.raises(SystemExit) as e:
        run(args_for(second, max_steps=8, dataloader_num_workers=0) +
            ["--resume_from_checkpoint", str(ckpt.checkpoint_root(first) / "step-4")])
    assert e.value.code == 2 and "is not empty" in capsys.readouterr().err


def test_a_save_error_of_any_kind_is_one_line(tmp_path, args_for, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("serializer exploded\nwith a second line")

    monkeypatch.setattr(ckpt, "save_model_folder", broken)
    with pytest.raises(SystemExit) as e:
        run(args_for(tmp_path / "run", max_steps=4, dataloader_num_workers=0))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(err) == 1
    assert "could not save checkpoint step-4: RuntimeError: serializer exploded (" in err[0]


@pytest.mark.slow
def test_two_process_stop_and_resume_matches(tmp_path, args_for):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    kw = dict(max_steps=16, eval_steps=8, save_steps=0, dataloader_num_workers=1)
    ref = tmp_path / "ref"
    proc = subprocess.run(script(args_for(ref, **kw), launcher), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(script(args_for(out, **kw), launcher), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 4, proc)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                           text=True).stdout.split()
    assert len(ranks) == 2
    os.kill(int(ranks[-1]), signal.SIGTERM)  # one rank is told; both must stop together
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by" in stdout
    step = max(losses(out))
    assert step < 16
    state = ckpt.checkpoint_root(out) / f"step-{step}" / "state"
    assert sorted(p.name for p in state.glob("data_rank*.json")) == ["data_rank0.json",
                                                                    "data_rank1.json"]
    proc = subprocess.run(script(args_for(out, **kw) + ["--resume_from_checkpoint", "latest"],
                                 launcher), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, ref, max_steps=16)


def test_resumed_wandb_run_continues_the_same_run(tmp_path, args_for, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    run(args_for(out, max_steps=2, save_steps=2, dataloader_num_workers=0, report_to="wandb"))
    saved = json.loads((ckpt.checkpoint_root(out) / "step-2" / "trainer_state.json").read_text())
    run_id = saved["tracker_id"]
    assert run_id and saved["run_config"]["training"]["save_steps"] == 2
    reset_accelerate()
    run(args_for(out, max_steps=4, save_steps=2, dataloader_num_workers=0, report_to="wandb") +
        ["--resume_from_checkpoint", "latest"])
    runs = sorted(p.name for p in out.rglob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs), runs
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_sigint_is_a_stop_request_like_sigterm():
    from clm.runtime import StopRequest

    before = signal.getsignal(signal.SIGINT)
    with StopRequest() as stop:
        assert not stop.local() and not stop.observe(False)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: no KeyboardInterrupt mid-step
        time.sleep(0.05)
        assert stop.local() and stop.signal_name == "SIGINT"
        assert stop.observe(True) and stop.signal_name == "SIGINT"
    with StopRequest() as stop:  # another rank's signal, summed with the step's counts
        assert stop.observe(True) and stop.signal_name == "a signal to another rank"
    assert signal.getsignal(signal.SIGINT) is before, "handlers are restored"
