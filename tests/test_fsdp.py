"""FSDP2 (`--fsdp full_shard`) over two CPU processes (torchrun, gloo): the same losses as DDP,
sharded checkpoints with exact resume, the HF folder gathered in full, export from the state."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clm import runtime
from clm.parallel import Topology
from clm.parallel.fsdp import FSDPBackend
from clm.config import TrainingConfig, UsageError
from helpers import (ROOT, assert_export_is_the_model, assert_same_records, assert_same_training,
                     metrics, torchrun, toy_args, world_of)

@pytest.mark.slow
def test_fsdp_two_processes_match_ddp_resume_and_export(tmp_path, corpus_dir, tokenizer_dir,
                                                        toy_config_dir):
    kw = dict(max_steps=4, eval_steps=2, save_steps=2, gradient_accumulation_steps=2,
              num_samples=1)
    outs = {}
    for name, extra in (("fsdp", ["--fsdp", "full_shard", "--ddp_timeout", "1234"]),
                        ("ddp", [])):
        outs[name] = tmp_path / name
        torchrun(tmp_path, "train_clm.py",
                 toy_args(corpus_dir, tokenizer_dir, toy_config_dir, outs[name], **kw) + extra)
    fsdp, ddp = outs["fsdp"], outs["ddp"]
    dist = yaml.safe_load((fsdp / "run_config.yaml").read_text())["distributed"]
    assert dist["fsdp"] == "full_shard" and dist["fsdp_version"] == 2
    assert dist["process_group_timeout_s"] == 1234  # --ddp_timeout, read from the group
    assert dist["accelerate_num_processes"] == 2 and dist["torch_world_size"] == 2
    # the same global batches, so the same losses and gradient norms as DDP
    a = [r for r in metrics(fsdp) if "loss" in r]
    b = [r for r in metrics(ddp) if "loss" in r]
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b] and a[-1]["tokens"] == 4 * 2 * 2 * 4 * 32
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-4)
    assert [r["eval_loss"] for r in metrics(fsdp) if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in metrics(ddp) if "eval_loss" in r], rel=1e-5)
    ckpt = fsdp / "checkpoints" / "step-4"
    states = [json.loads((ckpt / "state" / f"data_rank{r}.json").read_text()) for r in (0, 1)]
    assert states[0] != states[1], "each rank has its own place in its own shard"
    shards = sorted(p.name for p in (ckpt / "state" / "dcp").iterdir())
    assert ".metadata" in shards and len([s for s in shards if s.endswith(".distcp")]) == 2
    # the HF folders hold every weight, gathered in full (AdamW steps: DDP's within rounding)
    final, ref = load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert final.keys() == ref.keys()
    for key, value in ref.items():
        torch.testing.assert_close(final[key], value, rtol=1e-4, atol=1e-5)

    # export reads the sharded state without a process group: the final folder's weights
    assert_export_is_the_model(ckpt, fsdp, tmp_path / "exported")

    # exact resume from the step-2 shards
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    printed = torchrun(tmp_path, "train_clm.py",
                       toy_args(corpus_dir, tokenizer_dir, toy_config_dir, resumed, **kw)
                       + ["--fsdp", "full_shard", "--resume_from_checkpoint", "latest"])
    assert "resumed from" in printed and "at step 2" in printed
    assert_same_records(metrics(resumed), metrics(fsdp))
    assert_same_training(resumed, fsdp, max_steps=4, warmup_steps=2, learning_rate=3e-3,
                         min_lr=3e-4)


def test_accelerate_fsdp_config_selects_fsdp2_and_keeps_accelerate_out(monkeypatch):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "accelerate_configs" / "fsdp.yaml"))
    assert config.distributed_type.value == "FSDP" and config.fsdp_config["fsdp_version"] == 2
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` exports
    backend = runtime.start(TrainingConfig(output_dir="x"), Topology())
    assert isinstance(backend, FSDPBackend)
    assert backend.accelerator.distributed_type.value != "FSDP", "Accelerate does not wrap it again"


@pytest.mark.parametrize("kw, message", [
    ({"fsdp": "shard_grad_op"}, "unknown --fsdp 'shard_grad_op'"),
    ({"fsdp": "full_shard", "deepspeed": str(ROOT / "ds_configs" / "zero3.json")},
     "--fsdp and --deepspeed both given"),
])
def test_bad_fsdp_options_are_one_line_errors(kw, message):
    with pytest.raises(UsageError, match=message):
        TrainingConfig(output_dir="x", **kw)


@pytest.mark.slow
def test_muon_under_fsdp_gathers_each_matrix_matches_ddp_and_resumes(
        tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    """--optim muon on two processes: FSDP2 gathers each sharded update for Newton-Schulz and
    applies its own rows, so its losses are DDP's; its sharded checkpoint (Muon's momentum as
    DTensors) resumes exactly."""
    kw = dict(max_steps=4, eval_steps=2, save_steps=2, num_samples=0)
    muon = ["--optim", "muon", "--muon_lr_ratio", "2"]
    outs = {}
    for name, extra in (("fsdp", ["--fsdp", "full_shard"]), ("ddp", [])):
        outs[name] = tmp_path / name
        torchrun(tmp_path, "train_clm.py", toy_args(corpus_dir, tokenizer_dir, toy_config_dir,
                                                    outs[name], **kw) + muon + extra)
    for out in outs.values():
        assert world_of(out) == (2, 2)
        assert yaml.safe_load((out / "run_config.yaml").read_text())["training"]["optim"] == \
            "muon"
    a = [r for r in metrics(outs["fsdp"]) if "loss" in r]
    b = [r for r in metrics(outs["ddp"]) if "loss" in r]
    # Newton-Schulz runs in bf16 (8 bits), so a last-bit difference between reduce-scatter's
    # and all-reduce's gradient sums can round an element of an update differently: measured
    # 1e-4 relative on a gradient norm after 3 steps; a wrong shard moves it by far more
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-4)
    assert [r["grad_norm"] for r in a] == pytest.approx([r["grad_norm"] for r in b], rel=1e-3)
    # Muon's matrices: for the same reason a
    # last-bit difference between reduce-scatter's and all-reduce's gradient sums can move an
    # element of an update by a few bf16 steps: measured 7e-4 at most after 4 steps whose
    # largest element moves are ~1e-2; a wrong row offset or layout moves whole updates.
    # AdamW's tensors follow them through the forward pass (1.5e-5 seen). On equal gradients
    # the sharded step itself is exact (tests/dist_muon_check.py).
    final, ref = (load_file(out / "model.safetensors") for out in outs.values())
    for key, value in ref.items():
        muon_matrix = key.endswith("weight") and value.dim() == 2 and ".h." in key
        torch.testing.assert_close(final[key], value, rtol=1e-4,
                                   atol=3e-3 if muon_matrix else 1e-4)

    resumed = tmp_path / "resumed"
    shutil.copytree(outs["fsdp"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    torchrun(tmp_path, "train_clm.py", toy_args(corpus_dir, tokenizer_dir, toy_config_dir,
                                                resumed, **kw)
             + muon + ["--fsdp", "full_shard", "--resume_from_checkpoint", "latest"])
    assert_same_records(metrics(resumed), metrics(outs["fsdp"]))


def test_muon_step_on_fsdp2_shards_equals_the_unsharded_step(tmp_path):
    """The same gradients into an FSDP2-sharded model (uneven shards) and an unsharded one:
    the gathered weights after 3 Muon steps agree to float32 rounding on both ranks."""
    torchrun(tmp_path, "tests/dist_muon_check.py", [tmp_path])
    for rank in (0, 1):
        worst = json.loads((tmp_path / f"muon_rank{rank}.json").read_text())
        assert len(worst) == 28 and max(worst.values()) < 1e-7, worst
