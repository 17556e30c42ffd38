"""The benchmarks that hold our figures run end to end (a few steps, the test corpus) and print
what they promise; the reference GPT-2 they compare against is the architecture it claims."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from reference_gpt import GPT, RandomCrops  # noqa: E402


def test_reference_gpt_has_gpt2_shapes_and_learns():
    from transformers import GPT2Config, GPT2LMHeadModel

    ours = GPT(vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_positions=16)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                                    n_positions=16))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf), "same parameters as HF GPT-2 (biases, tied head)"
    crops = RandomCrops(np.tile(np.arange(64), 50), block_size=16, batch_size=8, seed=0)
    x, y = crops()
    assert torch.equal(y[:, :-1], x[:, 1:]) and x.shape == (8, 16)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = ours(*crops())
        first = first or loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < first / 2, "a counting sequence is easy to learn"


def write_config(tmp_path, corpus_dir, tokenizer_dir):
    path = tmp_path / "bench.yaml"
    path.write_text(f"dataset_name: {corpus_dir}\ntokenizer_name: {tokenizer_dir}\n"
                    "validation_split_percentage: 10\nvalidation_split_tokens: 512\n"
                    "dataloader_num_workers: 0\nlearning_rate: 3.0e-3\nwarmup_steps: 1\n"
                    "min_lr: 3.0e-4\nper_device_eval_batch_size: 8\n")
    return path


def test_train_throughput_runs_ours_and_the_reference(tmp_path, corpus_dir, tokenizer_dir):
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--config",
         str(write_config(tmp_path, corpus_dir, tokenizer_dir)), "--block_size", "32",
         "--batch_size", "4", "--warmup", "1", "--steps", "3", "--workers", "0",
         "--repeats", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    for side in ("ours", "reference"):
        assert result[side]["tokens_per_sec"] > 0 and result[side]["step_s"] > 0
        assert result[side]["peak_memory_gb"] > 0
        assert len(result[side]["tokens_per_sec_runs"]) == 2  # alternating runs
        assert result[side]["tokens_per_sec"] in result[side]["tokens_per_sec_runs"]
    assert result["ours"]["params"] == result["reference"]["params"], "same shapes"
    assert 0 <= result["ours"]["data_wait"] < 1 and result["ours_over_reference"] > 0


def test_learning_efficiency_compares_on_the_same_heldout(tmp_path, corpus_dir, tokenizer_dir):
    proc = subprocess.run(
        [sys.executable, "bench/learning_efficiency.py", "--config",
         str(write_config(tmp_path, corpus_dir, tokenizer_dir)), "--sizes", "tiny", "--seeds",
         "2", "--max_steps", "3", "--batch_size", "4", "--block_size", "32", "--",
         "--shuffle_buffer_blocks", "16"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1]
    result = json.loads(text)
    tiny = result["held_out_loss"]["tiny"]
    assert len(tiny["ours"]["runs"]) == len(tiny["random_crops"]["runs"]) == 2
    assert tiny["ours"]["runs"] != tiny["random_crops"]["runs"], "different data, other losses"
    assert all(3 < x < 7 for x in tiny["ours"]["runs"] + tiny["random_crops"]["runs"])
    docs = result["distinct_documents_per_micro_batch"]
    assert docs["shuffle_buffer_blocks=16"] > docs["shuffle_buffer_blocks=1"]


@pytest.mark.parametrize("script", ["bench/gpu_check.sh"])
def test_gpu_check_script_parses(script):
    assert subprocess.run(["bash", "-n", script], cwd=ROOT).returncode == 0
