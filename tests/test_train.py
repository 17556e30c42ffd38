"""train_clm.py end to end on a toy model: outputs, exact gradient accumulation, DDP, guards, errors."""

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml

from clm import loop, optim
from clm.config import ModelConfig, TrainingConfig, parse_config
from helpers import (ROOT, TYPES, assert_same_weights, metrics, reset_accelerate, run, torchrun,
                     toy_args)


def test_end_to_end_outputs_and_pipeline(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    out = tmp_path / "run"
    result = run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out))
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "README.md", "run_config.yaml", "metrics.jsonl", "loss_curve.png",
                 "samples.txt"):
        assert (out / name).is_file(), name
    records = metrics(out)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert train[-1]["tokens"] == 6 * 4 * 32
    for r in train:
        assert set(r) >= {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_sec",
                          "elapsed_s", "mfu"}
        assert r["mfu"] is None, "no peak FLOP/s is known for a CPU"
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert math.isclose(evals[-1]["eval_ppl"], math.exp(evals[-1]["eval_loss"]))
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert cfg["world_size"] == 1 and cfg["tokens_per_step"] == 128
    assert cfg["training"]["max_steps"] == 6 and "transformers" in cfg["versions"]
    assert result["final_eval_loss"] == evals[-1]["eval_loss"]
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and f"{evals[-1]['eval_loss']:.4f}" in card

    from transformers import pipeline

    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("doc1", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("doc1") and len(text) > 4
    gc = json.loads((out / "generation_config.json").read_text())
    assert gc["eos_token_id"] == 0 and gc["suppress_tokens"] == list(range(400, 448))


def test_gradient_accumulation_is_exact(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    from safetensors.torch import load_file

    runs = {}
    for bs, ga in ((8, 1), (4, 2), (2, 4)):
        out = tmp_path / f"b{bs}"
        run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=4, eval_steps=0,
                     per_device_train_batch_size=bs, gradient_accumulation_steps=ga,
                     num_samples=0))
        train = [r for r in metrics(out) if "loss" in r]
        runs[(bs, ga)] = ([r["loss"] for r in train], [r["grad_norm"] for r in train],
                          load_file(out / "model.safetensors"))
    ref_loss, ref_norm, ref_w = runs[(8, 1)]
    from clm.config import TrainingConfig

    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=4, warmup_steps=2,
                         learning_rate=3e-3, min_lr=3e-4)
    for key, (losses, norms, weights) in runs.items():
        assert losses == pytest.approx(ref_loss, rel=1e-5), key
        # Adam hides a mis-scaled gradient in the weights; the gradient norm does not
        assert norms == pytest.approx(ref_norm, rel=1e-5), key
        assert_same_weights(weights, ref_w, cfg)


@pytest.mark.slow
def test_two_process_ddp_run(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    out = tmp_path / "ddp"
    # 150 steps of 4 x 32 tokens is more than either rank's share of the corpus: both ranks
    # run out (unevenly) and must cycle on without hanging.
    args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=150,
                    eval_steps=75, logging_steps=25, num_samples=1, dataloader_num_workers=1)
    printed = torchrun(tmp_path, "train_clm.py", args)
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert cfg["world_size"] == 2 and cfg["global_batch_sequences"] == 8
    records = metrics(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [25, 50, 75, 100, 125, 150], "one writer, no duplicates"
    assert train[-1]["tokens"] == 150 * 2 * 4 * 32, "tokens count both ranks"
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 75, 150]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert printed.count("final eval loss") == 1, "only rank 0 reports"
    written = sorted(p.name for p in out.iterdir())
    assert ".model.tmp" not in written


def test_lr_schedule():
    cfg = TrainingConfig(output_dir="x", learning_rate=1.0, min_lr=0.1, warmup_steps=10,
                         max_steps=110)
    lrs = [optim.lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # half way down the cosine
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert optim.lr_at(110, cfg) == pytest.approx(0.1) and lrs[-1] > 0.1


def test_nan_guard_skips_then_stops(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir,
                                    monkeypatch, capsys):
    from safetensors.torch import load_file

    calls = {"n": 0}
    real = loop.token_nll
    bad = {3, 4, 5}  # forward calls (= steps 4, 5, 6 with GA 1) whose loss is NaN

    def flaky(model, batch):
        calls["n"] += 1
        nll = real(model, batch)
        return nll * float("nan") if model.training and calls["n"] - 1 in bad else nll

    monkeypatch.setattr(loop, "token_nll", flaky)
    out = tmp_path / "nan"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, eval_steps=0, max_steps=6,
                 save_steps=3, validation_split_percentage=0, num_samples=0))
    train = [r for r in metrics(out) if "eval_loss" not in r]
    assert [r["step"] for r in train if r.get("skipped")] == [4, 5, 6]
    assert all(r["loss"] is None for r in train if r.get("skipped"))
    assert all(math.isfinite(r["loss"]) for r in train if not r.get("skipped"))
    at_step_3 = load_file(out / "checkpoints" / "step-3" / "model.safetensors")
    final = load_file(out / "model.safetensors")
    assert all(torch.equal(at_step_3[k], final[k]) for k in final), "skipped steps change nothing"

    bad.update(range(0, 100))
    reset_accelerate()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # a failed run: one line, exit 1 (tests/test_failures.py)
        run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "nan2",
                     eval_steps=0, max_steps=6, validation_split_percentage=0, max_bad_steps=3))
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "error: 3 optimizer steps in a row had a non-finite loss or gradient")


def test_eager_and_sdpa_agree(toy_config_dir, tokenizer):
    from clm.model import build_model

    torch.manual_seed(0)
    sdpa = build_model(ModelConfig(config_name=str(toy_config_dir)), tokenizer, 32)
    eager = build_model(ModelConfig(config_name=str(toy_config_dir), attn_implementation="eager"),
                        tokenizer, 32)
    eager.load_state_dict(sdpa.state_dict())
    assert sdpa.config._attn_implementation == "sdpa"
    assert eager.config._attn_implementation == "eager"
    ids = torch.randint(0, 400, (3, 32))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=ids).logits, eager(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)


def test_gpt2_init_and_padded_vocab(tokenizer):
    from clm.model import build_model, flops_per_token, num_params

    model = build_model(ModelConfig(model_preset="tiny"), tokenizer, 256)
    assert model.config.vocab_size == 448  # 400 rounded up to a multiple of 64
    n_layer = model.config.n_layer
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h])
    fc = torch.cat([b.mlp.c_fc.weight.flatten() for b in model.transformer.h])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.generation_config.suppress_tokens == list(range(400, 448))
    assert flops_per_token(model, 256) > 6 * num_params(model, non_embedding=True)


@pytest.mark.parametrize("case,overrides,message", [
    ("preset", {"model_preset": "gpt5", "config_name": ""}, "unknown --model_preset 'gpt5'"),
    ("block", {"block_size": 128}, "--block_size 128 is above the model's 64 positions"),
    ("column", {"text_column": "body"}, "--text_column 'body' not found"),
    ("file", {"train_files": "/nonexistent/*.jsonl"}, "matches no file"),
    ("lr", {"min_lr": 1.0}, "--min_lr 1.0 must be between"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, corpus_dir, tokenizer_dir,
                                      toy_config_dir, case, overrides, message):
    out = tmp_path / "o"
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, **overrides)
    if overrides.get("config_name") == "":
        i = argv.index("--config_name")
        del argv[i:i + 2]
    with pytest.raises(SystemExit) as e:
        run(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists(), "nothing is written before the inputs are checked"


def test_vocab_mismatch_and_finished_run_are_refused(tmp_path, capsys, corpus_dir,
                                                     tokenizer_dir, toy_config_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    small = tmp_path / "small"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64,
                               vocab_size=128)).save_pretrained(small)
    argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "o",
                    model_name_or_path=small)
    with pytest.raises(SystemExit):
        run(argv)
    assert "tokenizer has 400 tokens but the model only 128" in capsys.readouterr().err

    out = tmp_path / "done"
    out.mkdir()
    (out / "model.safetensors").write_text("a finished run")
    with pytest.raises(SystemExit) as e:
        run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out))
    assert e.value.code == 2 and "--overwrite_output_dir" in capsys.readouterr().err
    assert (out / "model.safetensors").read_text() == "a finished run"


def test_unknown_option_via_cli_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_clm.py"), "--output_dir",
                           str(tmp_path / "o"), "--max_stepz", "3"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --max_stepz 3 (see --help)"]


def test_tensorboard_tracker(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    out = tmp_path / "tb"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=2, eval_steps=0,
                 num_samples=0, report_to="tensorboard"))
    assert list(out.rglob("events.out.tfevents.*")), "tensorboard event files written"


def test_every_shipped_yaml_parses():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert files
    for f in files:
        if f.name.startswith("sft"):
            continue
        data_cfg, model_cfg, train_cfg = parse_config(TYPES, ["--config", str(f)])
        assert train_cfg.output_dir and data_cfg.block_size >= 2


def test_bf16_autocast_and_wandb_offline(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir,
                                         monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "bf16"
    result = run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=2,
                          eval_steps=0, num_samples=0, mixed_precision="bf16",
                          report_to="wandb"))
    assert math.isfinite(result["final_eval_loss"])
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float32 for t in load_file(out / "model.safetensors").values()), \
        "master weights stay fp32 under bf16 autocast"
    assert list(out.rglob("offline-run-*")), "wandb wrote an offline run"


def test_torch_compile_trains_and_resumes_without_it(tmp_path, corpus_dir, tokenizer_dir,
                                                     toy_config_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "compiled"
    args = lambda steps, **kw: toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out,  # noqa
                                        max_steps=steps, eval_steps=0, num_samples=1,
                                        save_steps=2, **kw)
    result = run(args(2, torch_compile="true"))
    assert math.isfinite(result["final_eval_loss"])
    assert loop._chunk_nll_fn is not loop._chunk_nll, "the loss was compiled with the model"
    AutoModelForCausalLM.from_pretrained(out)  # saved without torch.compile's wrapper names
    compiled = load_file(out / "checkpoints" / "step-2" / "state" / "model.safetensors")
    assert not [k for k in compiled if "_orig_mod" in k]
    reset_accelerate()
    run(args(4) + ["--resume_from_checkpoint", "latest"])
    assert loop._chunk_nll_fn is loop._chunk_nll, "a run without --torch_compile runs eager"
    plain = load_file(out / "checkpoints" / "step-4" / "state" / "model.safetensors")
    # the same names either way, so the reverse (plain checkpoint, compiled resume) loads too
    assert plain.keys() == compiled.keys()


def test_gradient_checkpointing_recomputes_and_trains_the_same(tmp_path, corpus_dir,
                                                                tokenizer_dir, toy_config_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    from clm import model as models
    from helpers import assert_same_training

    toy = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64,
                                     vocab_size=128))
    models.enable_gradient_checkpointing(toy)
    calls = []  # a pre-hook inside the block: the recomputation stops once it has what it needs
    toy.transformer.h[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    ids = torch.randint(0, 128, (2, 16))
    toy.train()
    toy(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 2, "the block ran again in the backward pass"
    toy.eval()
    with torch.no_grad():
        toy(input_ids=ids)
    assert len(calls) == 3, "evaluation does not recompute"

    schedule = {"max_steps": 3, "warmup_steps": 2, "learning_rate": 3e-3, "min_lr": 3e-4}
    for on in ("false", "true"):
        run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / on, eval_steps=0,
                     num_samples=0, gradient_checkpointing=on, **schedule))
        reset_accelerate()
    assert_same_training(tmp_path / "false", tmp_path / "true", **schedule)
    for on, flag in (("false", False), ("true", True)):
        cfg = yaml.safe_load((tmp_path / on / "run_config.yaml").read_text())
        assert cfg["training"]["gradient_checkpointing"] is flag
    saved = json.loads((tmp_path / "true" / "config.json").read_text())
    assert not [k for k in saved if "checkpointing" in k], "the model folder is unchanged"


@pytest.mark.parametrize("given, launcher, expected", [
    (None, None, "no"), (None, "bf16", "bf16"), (None, "fp16", "fp16"), (None, "no", "no"),
    ("bf16", None, "bf16"), ("bf16", "no", "bf16"), ("fp16", "fp16", "fp16"), ("no", "no", "no"),
])
def test_mixed_precision_from_the_launcher(monkeypatch, given, launcher, expected):
    from clm.parallel import launch

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    assert launch.resolve_mixed_precision(given) == expected


def test_mixed_precision_contradicting_the_launcher_is_an_error(tmp_path, monkeypatch):
    from clm.config import UsageError
    from clm.parallel import launch
    from clm.parallel.deepspeed import deepspeed_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    for given in ("fp16", "no"):
        with pytest.raises(UsageError) as e:
            launch.resolve_mixed_precision(given)
        assert str(e.value) == (
            f"--mixed_precision {given} contradicts the launcher's bf16 (accelerate launch "
            "--mixed_precision / the accelerate config): pass one of them")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp8")
    with pytest.raises(UsageError, match="the launcher's mixed precision fp8 is not supported"):
        launch.resolve_mixed_precision(None)
    # a DeepSpeed JSON that enables bf16 is checked against the resolved precision, as before
    ds = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    ds["bf16"] = {"enabled": True}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    cfg = TrainingConfig(output_dir=str(tmp_path / "o"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert deepspeed_config(str(path), cfg, 1)["bf16"] == {"enabled": True}
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION")
    with pytest.raises(UsageError, match="enables bf16 but --mixed_precision is no"):
        deepspeed_config(str(path), cfg, 1)


def test_launcher_precision_is_used_and_recorded(tmp_path, corpus_dir, tokenizer_dir,
                                                 toy_config_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    out = tmp_path / "launcher_bf16"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=1, eval_steps=0,
                 num_samples=0))
    cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert cfg["training"]["mixed_precision"] == "bf16", "the precision the run used"


def test_precision_contradiction_via_cli_subprocess(tmp_path):
    import os

    proc = subprocess.run([sys.executable, str(ROOT / "train_clm.py"), "--output_dir",
                           str(tmp_path / "o"), "--mixed_precision", "fp16"],
                          capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --mixed_precision fp16 contradicts the launcher's bf16 (accelerate launch "
        "--mixed_precision / the accelerate config): pass one of them"]
    assert not (tmp_path / "o").exists()
