"""--dry_run: the plan's figures (parameters, FLOPs, memory by backend, fits, suggestions) and a
CLI that reads no data and writes nothing."""

import json
import os
import subprocess
import sys

import pytest
import torch

from clm import model as models, plan
from clm.config import DataConfig, ModelConfig, TrainingConfig, UsageError, parse_config
from helpers import ROOT, TYPES, run

GIB = 2**30


def configs(tmp_path, *argv):
    return parse_config(TYPES, ["--output_dir", str(tmp_path / "out"), "--dry_run",
                                "--dry_run_gpu_memory_gb", "80", *map(str, argv)])


def make_plan(tmp_path, *argv):
    return plan.make_plan(*configs(tmp_path, *argv))


def test_gpt2_preset_figures_match_a_real_model_on_meta(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    p = make_plan(tmp_path, "--model_preset", "gpt2", "--block_size", 1024,
                  "--per_device_train_batch_size", 16, "--gradient_accumulation_steps", 4,
                  "--dry_run_num_gpus", 8, "--max_steps", 1000)
    with torch.device("meta"):
        ref = GPT2LMHeadModel(GPT2Config(vocab_size=50304))
    assert p["vocab_size"] == 50304 == models.padded_vocab(50257)
    assert p["params"] == sum(t.numel() for t in ref.parameters()) == 124_475_904
    assert p["non_embedding_params"] == models.num_params(ref, non_embedding=True)
    assert p["flops_per_token"] == models.flops_per_token(ref, 1024)
    assert p["tokens_per_step"] == 16 * 4 * 8 * 1024 == 524_288
    hours = 1000 * 524_288 * p["flops_per_token"] / (8 * 989e12 * 0.4) / 3600
    assert p["hours_to_max_steps"] == pytest.approx(hours, abs=1e-3)
    m = p["memory_gib"]
    parts = m["weights"] + m["gradients"] + m["optimizer"] + m["activations"]
    assert m["total"] == pytest.approx(parts, abs=0.01) and p["fits"]
    # fp32 AdamW: 8 bytes of optimizer state per parameter
    assert m["optimizer"] == pytest.approx(8 * p["params"] / GIB, abs=1e-3)


def test_vocab_from_a_local_tokenizer_folder(tmp_path, tokenizer_dir, tokenizer):
    n, note = plan.tokenizer_vocab(str(tokenizer_dir))
    assert n == len(tokenizer) == 400 and "tokenizer.json" in note
    p = make_plan(tmp_path, "--model_preset", "tiny", "--tokenizer_name", tokenizer_dir,
                  "--block_size", 128)
    assert p["vocab_size"] == 448


def test_zero_stages_shard_by_the_number_of_gpus():
    shape = plan.Shape("x", params=1_000_000, non_embedding=800_000, largest_layer=100_000,
                       n_layer=4, n_head=4, hidden=256, vocab=1000, positions=256,
                       flops_per_token=6e6, vocab_note="")
    base = plan.Setup("ddp", 0, False, False, "no", micro_batch=4, accumulation=1,
                      checkpointing=False, num_gpus=8, block_size=256, eager_attention=False)
    ddp = plan.memory_bytes(shape, base)
    z = {stage: plan.memory_bytes(shape, plan.replace(base, backend="deepspeed", shard=stage))
         for stage in (1, 2, 3)}
    p, gathered = shape.params, 2 * shape.largest_layer * 4
    assert ddp["weights"] == 4 * p and ddp["optimizer"] == 8 * p
    assert ddp["gradients"] == 2 * 4 * p, "DDP's buckets are a second copy of the gradients"
    assert z[1]["optimizer"] == ddp["optimizer"] / 8 and z[1]["weights"] == 4 * p
    assert z[2]["gradients"] == 4 * p / 8 and z[2]["weights"] == 4 * p
    assert z[3]["weights"] == 4 * p / 8 + gathered
    assert z[3]["optimizer"] == ddp["optimizer"] / 8 and z[3]["gradients"] == 4 * p / 8
    assert all(z[s]["activations"] == ddp["activations"] for s in z)
    # bf16 under DeepSpeed: 16-bit weights and gradients, fp32 master weights in the optimizer
    half = plan.memory_bytes(shape, plan.replace(base, backend="deepspeed", shard=3,
                                                 precision="bf16"))
    assert half["optimizer"] == 12 * p / 8 and half["weights"] == 2 * p / 8 + 2 * 100_000 * 2
    off = plan.memory_bytes(shape, plan.replace(base, backend="deepspeed", shard=3,
                                                precision="bf16", offload_optimizer=True,
                                                offload_params=True))
    assert off["optimizer"] == 0 and off["weights"] == 2 * 100_000 * 2 and off["host"] > 0


def test_ddp_and_zero3_plans_from_the_cli_options(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ("--model_preset", "gpt2-medium", "--mixed_precision", "bf16",
            "--dry_run_num_gpus", 8, "--per_device_train_batch_size", 4)
    ddp = make_plan(tmp_path, *args)
    z3 = make_plan(tmp_path, *args, "--deepspeed", "ds_configs/zero3.json")
    assert ddp["backend"].startswith("DDP") and z3["backend"].startswith("DeepSpeed ZeRO-3")
    states = lambda p: sum(p["memory_gib"][k]  # noqa: E731
                           for k in ("weights", "gradients", "optimizer"))
    assert states(z3) < states(ddp) / 6
    assert z3["memory_gib"]["activations"] == ddp["memory_gib"]["activations"]
    assert z3["tokens_per_step"] == ddp["tokens_per_step"]
    if z3["deepspeed_estimate_gib"] is not None:  # DeepSpeed's own figure, where installed
        assert z3["deepspeed_estimate_gib"] == pytest.approx(states(z3), rel=0.25)


def test_gradient_checkpointing_lowers_activations_only(tmp_path):
    args = ("--model_preset", "gpt2", "--per_device_train_batch_size", 8)
    plain = make_plan(tmp_path, *args)
    ckpt = make_plan(tmp_path, *args, "--gradient_checkpointing")
    layers = lambda p: p["memory_gib"]["activations"] - p["memory_gib"]["logits"]  # noqa: E731
    assert layers(ckpt) < layers(plain) / 4
    assert ckpt["memory_gib"]["total"] < plain["memory_gib"]["total"]
    for key in ("weights", "gradients", "optimizer", "logits"):
        assert ckpt["memory_gib"][key] == plain["memory_gib"][key]
    assert ckpt["gradient_checkpointing"] and not plain["gradient_checkpointing"]


def test_a_plan_that_does_not_fit_suggests_one_that_does(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the suggestions name ds_configs/ relative to the repository
    argv = ["--model_preset", "gpt2-xl", "--per_device_train_batch_size", 32,
            "--mixed_precision", "bf16", "--dry_run_num_gpus", 8]
    data_cfg, model_cfg, train_cfg = parse_config(TYPES, [
        "--output_dir", str(tmp_path / "out"), "--dry_run", "--dry_run_gpu_memory_gb", "24",
        *map(str, argv)])
    p = plan.make_plan(data_cfg, model_cfg, train_cfg)
    assert not p["fits"] and p["backend"].startswith("DDP")
    assert p["memory_gib"]["total"] > 24
    fitting = [s for s in p["suggestions"] if s["fits"]]
    assert fitting and all(s["memory_gib"] <= 0.9 * 24 for s in fitting)
    changes = " ".join(s["change"] for s in p["suggestions"])
    for change in ("ZeRO-3", "gradient checkpointing", "micro-batch 16"):
        assert change in changes
    # what is suggested really fits, at the same tokens per step, when planned again
    again = plan.make_plan(*parse_config(TYPES, [
        "--output_dir", str(tmp_path / "out"), "--dry_run", "--dry_run_gpu_memory_gb", "24",
        *map(str, argv), *fitting[-1]["args"].split()]))
    assert again["fits"] and again["tokens_per_step"] == p["tokens_per_step"]
    assert again["memory_gib"]["total"] == pytest.approx(fitting[-1]["memory_gib"])


def test_dry_run_in_process_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    result = run(["--output_dir", str(out), "--dry_run", "--model_preset", "tiny",
                  "--block_size", "128", "--train_files", str(tmp_path / "missing" / "*.txt"),
                  "--dry_run_gpu", "NVIDIA A100-SXM4-40GB", "--dry_run_gpu_memory_gb", "40"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == json.loads(json.dumps(result))
    assert result["gpu"] == "NVIDIA A100-SXM4-40GB" and result["gpu_memory_gib"] == 40
    assert not out.exists() and not list(tmp_path.iterdir())


def test_dry_run_cli_exit_0_json_last_reads_no_data(tmp_path, tokenizer_dir):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_clm.py"), "--dry_run", "--output_dir", str(out),
         "--train_files", str(tmp_path / "no_such_data" / "*.jsonl"),
         "--tokenizer_name", str(tokenizer_dir), "--model_preset", "tiny", "--block_size", "256",
         "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
         "--dry_run_num_gpus", "2", "--dry_run_mfu", "0.5", "--max_steps", "100"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["tokens_per_step"] == 4 * 2 * 2 * 256 and last["vocab_size"] == 448
    assert set(last["memory_gib"]) >= {"weights", "gradients", "optimizer", "activations",
                                       "total"}
    assert {"params", "flops_per_token", "fits", "gpu_memory_gib", "suggestions",
            "hours_to_max_steps"} <= set(last)
    assert "tokens per step" in proc.stdout and "memory per GPU" in proc.stdout
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, value, message", [
    ("dry_run_mfu", 0.0, "--dry_run_mfu 0.0 is out of range"),
    ("dry_run_mfu", 1.5, "--dry_run_mfu 1.5 is out of range"),
    ("dry_run_gpu_memory_gb", -1.0, "--dry_run_gpu_memory_gb must be > 0"),
    ("dry_run_num_gpus", 0, "--dry_run_num_gpus must be >= 1"),
    ("dry_run_gpu", "H100", "unknown --dry_run_gpu 'H100' (choose one of: NVIDIA B200;"),
])
def test_dry_run_options_are_checked(tmp_path, option, value, message):
    with pytest.raises(UsageError) as e:
        TrainingConfig(output_dir=str(tmp_path), **{option: value})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_block_size_above_positions_is_the_usual_error(tmp_path):
    with pytest.raises(UsageError, match="--block_size 512 is above the model's 256 positions"):
        plan.make_plan(DataConfig(block_size=512), ModelConfig(model_preset="tiny"),
                       TrainingConfig(output_dir=str(tmp_path), dry_run=True))


def test_activation_formula_matches_what_autograd_saves():
    """On CPU in fp32 the tensors autograd keeps for the backward can be counted exactly: the
    Korthikanti et al. estimate of a GPT-2 forward (SDPA, no recomputation) is within 20%."""
    from transformers import GPT2Config, GPT2LMHeadModel

    b, t, h, layers, heads = 4, 256, 256, 4, 4
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_head=heads, n_embd=h, n_positions=t,
                                       vocab_size=512, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0, activation_function=models.FAST_GELU))
    model.set_attn_implementation("sdpa")
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=torch.randint(0, 512, (b, t)))
    shape = plan.Shape("toy", 0, 0, 0, n_layer=layers, n_head=heads, hidden=h, vocab=512,
                       positions=t, flops_per_token=0.0, vocab_note="")
    setup = plan.Setup("ddp", 0, False, False, "no", micro_batch=b, accumulation=1,
                       checkpointing=False, num_gpus=1, block_size=t, eager_attention=False)
    estimate, _ = plan.activation_bytes(shape, setup)
    assert sum(saved.values()) == pytest.approx(estimate, rel=0.2)
