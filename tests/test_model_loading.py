"""The model a run trains: fp32 master weights whatever the checkpoint's dtype, and
--attn_implementation flash_attention_2 refused in one line where it cannot run."""

import subprocess
import sys

import pytest
import torch

from clm import loop
from clm.config import ModelConfig
from helpers import ROOT, reset_accelerate, run, toy_args

sys.path.insert(0, str(ROOT / "finetune"))
import run_sft  # noqa: E402

FLASH_MISSING = ("error: --attn_implementation flash_attention_2 needs the flash-attn package, "
                 "which is not installed (pip install flash-attn on a CUDA machine, or "
                 "--attn_implementation sdpa)")


def run_sft_main(model, tmp_path, **kw):
    import json

    from clm.config import TrainingConfig, run_cli
    from clm.sft import LoraArgs, SFTDataConfig
    from clm.task_eval import GenerationEvalConfig

    words = ["ka", "lo", "mi", "ten", "ra", "sol", "ve", "nu"]
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"join {a} {b}:", "completion": f" {a}{b}"})
                            + "\n" for a in words for b in words[:4]))
    args = {"model_name_or_path": model, "train_files": data, "output_dir": tmp_path / "sft",
            "block_size": 48, "per_device_train_batch_size": 4, "max_steps": 2,
            "eval_steps": 0, "warmup_steps": 1, "learning_rate": 3e-3, "min_lr": 3e-4,
            "validation_split_percentage": 20, "num_samples": 0, "seed": 0, **kw}
    return run_cli(run_sft.main, [SFTDataConfig, ModelConfig, TrainingConfig, LoraArgs,
                                  GenerationEvalConfig],
                   [x for k, v in args.items() for x in (f"--{k}", str(v))])


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory, tokenizer, toy_config_dir):
    """A toy model saved in bf16, as many Hub checkpoints are, with its tokenizer."""
    from clm.model import build_model

    path = tmp_path_factory.mktemp("bf16") / "model"
    model = build_model(ModelConfig(config_name=str(toy_config_dir)), tokenizer, 32)
    model.to(torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_bf16_checkpoint_is_built_in_fp32(bf16_model, tokenizer):
    from safetensors.torch import load_file

    from clm.model import build_model

    assert {t.dtype for t in load_file(bf16_model / "model.safetensors").values()} == \
        {torch.bfloat16}
    model = build_model(ModelConfig(model_name_or_path=str(bf16_model)), tokenizer, 32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.config.dtype == torch.float32


@pytest.fixture
def trained(monkeypatch):
    """The dtypes of the parameters and of AdamW's states after the loop ran."""
    seen = {}
    real = loop.train

    def spy(cfg, backend, model, optimizer, *args, **kwargs):
        state = real(cfg, backend, model, optimizer, *args, **kwargs)
        seen["params"] = {p.dtype for p in model.parameters() if p.requires_grad}
        seen["states"] = {v.dtype for s in optimizer.state.values() for k, v in s.items()
                          if k in ("exp_avg", "exp_avg_sq")}
        return state

    monkeypatch.setattr(loop, "train", spy)
    return seen


def test_continued_pretraining_of_a_bf16_checkpoint_has_fp32_masters(
        tmp_path, bf16_model, corpus_dir, tokenizer_dir, toy_config_dir, trained):
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, tmp_path / "pre", max_steps=2,
                 eval_steps=0, num_samples=0, model_name_or_path=bf16_model,
                 mixed_precision="bf16"))
    assert trained == {"params": {torch.float32}, "states": {torch.float32}}


def test_finetuning_a_bf16_checkpoint_has_fp32_masters(tmp_path, bf16_model, trained):
    run_sft_main(bf16_model, tmp_path, mixed_precision="bf16")
    assert trained == {"params": {torch.float32}, "states": {torch.float32}}


@pytest.mark.parametrize("script", ["train_clm.py", "finetune/run_sft.py"])
def test_flash_attention_without_the_package_is_one_line_exit_2(
        tmp_path, script, bf16_model, corpus_dir, tokenizer_dir, toy_config_dir):
    out = tmp_path / "o"
    if script == "train_clm.py":
        argv = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out)
    else:
        (tmp_path / "records.jsonl").write_text('{"prompt": "ka", "completion": " lo"}\n' * 40)
        argv = ["--model_name_or_path", str(bf16_model), "--train_files",
                str(tmp_path / "records.jsonl"), "--output_dir", str(out)]
    proc = subprocess.run([sys.executable, str(ROOT / script), *argv, "--attn_implementation",
                           "flash_attention_2"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [FLASH_MISSING]
    assert not out.exists()


def test_flash_attention_without_a_gpu_is_one_line_exit_2(tmp_path, monkeypatch, capsys,
                                                          bf16_model, corpus_dir,
                                                          tokenizer_dir, toy_config_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine can run flash-attn")
    fake = tmp_path / "site"  # flash-attn "installed" (no GPU machine has it for real)
    (fake / "flash_attn").mkdir(parents=True)
    (fake / "flash_attn" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(fake))
    message = ("error: --attn_implementation flash_attention_2 needs a CUDA GPU and this "
               "machine has none (run on a GPU node, or pass --attn_implementation sdpa)")
    out = tmp_path / "pre"
    with pytest.raises(SystemExit) as e:
        run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out,
                     attn_implementation="flash_attention_2"))
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
    assert not out.exists()

    reset_accelerate()
    with pytest.raises(SystemExit) as e:
        run_sft_main(bf16_model, tmp_path, attn_implementation="flash_attention_2")
    assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [message]
