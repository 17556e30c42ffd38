"""The benchmarks that hold our figures run end to end (a few steps, the test corpus) and print
what they promise; the reference GPT-2 they compare against is the architecture it claims."""

import json
import os
import re
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


def train_throughput(tmp_path, corpus_dir, tokenizer_dir, *extra) -> dict:
    """bench/train_throughput.py on the toy corpus at toy shapes; its JSON."""
    proc = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--config",
         str(write_config(tmp_path, corpus_dir, tokenizer_dir)), "--block_size", "32",
         "--batch_size", "4", "--warmup", "1", "--steps", "3", "--workers", "0", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_train_throughput_runs_ours_and_the_reference(tmp_path, corpus_dir, tokenizer_dir):
    result = train_throughput(tmp_path, corpus_dir, tokenizer_dir, "--repeats", "2")
    for side in ("ours", "reference"):
        assert result[side]["tokens_per_sec"] > 0 and result[side]["step_s"] > 0
        assert result[side]["peak_memory_gb"] > 0
        assert len(result[side]["tokens_per_sec_runs"]) == 2  # alternating runs
        assert result[side]["tokens_per_sec"] in result[side]["tokens_per_sec_runs"]
    assert result["ours"]["params"] == result["reference"]["params"], "same shapes"
    assert 0 <= result["ours"]["data_wait"] < 1 and result["ours_over_reference"] > 0


@pytest.mark.slow
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


GPU_CHECK_ITEMS = ["setup", "plan", "pretrain", "reference", "zero2", "sft", "generate"]


def gpu_check(tmp_path, *args, **env):
    """bench/gpu_check.sh as the device runs it, with this venv's python first on PATH and
    everything it writes under tmp_path; returns (process, table rows, results by item)."""
    out, bin_dir = tmp_path / "out", tmp_path / "bin"
    # python alone, not the venv's bin/: its ninja (pip's) hashes build commands unlike the
    # system's, and would rebuild C++ ops the system's ninja built (minutes on 2 cores)
    bin_dir.mkdir()
    for name in ("python", "python3"):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    environ = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "TMPDIR": str(tmp_path),
               "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    proc = subprocess.run(["bash", "bench/gpu_check.sh", *args], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=1500)
    rows = [x for x in (out / "table.md").read_text().splitlines()
            if x.startswith("| ") and not x.startswith("| item ")]
    results = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return proc, rows, {r["item"]: r for r in results}


@pytest.mark.slow
def test_gpu_check_runs_every_item_on_cpu(tmp_path):
    # the caps stop hung items; on a machine shared with other jobs an item may take several
    # times its quiet time, which is not what this test is about
    proc, rows, results = gpu_check(tmp_path, "--cpu", GPU_CHECK_SLACK="4")
    log = (tmp_path / "out" / "log.txt").read_text()
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-1000:]}\n{log[-4000:]}"
    assert list(results) == GPU_CHECK_ITEMS
    assert [r["status"] for r in results.values()] == ["ok"] * 7
    assert len(rows) == 7 and all(row.split(" | ")[2] == "ok" for row in rows), rows
    # printed as each item finished, the same rows as the file's
    assert [x for x in proc.stdout.splitlines() if x.startswith("| ")][1:] == rows
    plan, ours, ref = results["plan"], results["pretrain"], results["reference"]
    assert plan["memory_gib"]["total"] > 0
    assert ours["tokens_per_sec"] > 0 and ours["peak_memory_gb"] > 0
    assert ours["planned_memory_gib"] == plan["memory_gib"]["total"]
    assert ours["sdpa_backends"] == "any", "no kernel restriction on CPU"
    assert re.search(r"tokens/s [0-9][0-9,.]*; MFU n/a; peak memory [0-9.]+ GiB \(--dry_run: "
                     r"[0-9.]+ GiB, measured/planned [0-9.]+\); SDPA kernels any", rows[2])
    assert ref["tokens_per_sec"] > 0 and ref["ours_over_reference"] == pytest.approx(
        ours["tokens_per_sec"] / ref["tokens_per_sec"], rel=1e-2)
    z2 = results["zero2"]
    assert z2["steps"] == 4 and z2["checkpoints"] == ["step-4"] and 0 < z2["final_eval_loss"] < 10
    sft = results["sft"]
    assert sft["base"] == "the pretrain item's model" and sft["steps"] == 3
    assert 0 < sft["final_loss"] < 10 and 0 < sft["final_eval_loss"] < 10
    gen = results["generate"]
    assert gen["completions"] == 2 and 0 < gen["decoded_positions"] <= 2 * 16
    assert gen["tokens_per_sec"] > 0 and gen["sample"]
    assert not list(tmp_path.glob("gpu_check_work.*")), "the work folder is removed"


def test_gpu_check_out_of_time_still_writes_every_row(tmp_path):
    proc, rows, results = gpu_check(tmp_path, "--cpu", GPU_CHECK_BUDGET_S="1")
    assert proc.returncode == 1
    assert list(results) == GPU_CHECK_ITEMS and len(rows) == 7
    assert {r["status"] for r in results.values()} == {"skipped"}
    assert all("skipped: out of time" in row for row in rows[:5]), rows
    assert all("skipped: no trained model" in row for row in rows[5:]), rows


@pytest.mark.parametrize("rc, result", [
    ("1", "failed (exit 1): RuntimeError: CUDA error: no kernel image"),
    ("124", "timed out after 30 s (exit 124): RuntimeError: CUDA error: no kernel image"),
    ("0", "failed: exit 0 but NoResult: no JSON result in pretrain.out")])
def test_gpu_check_row_of_a_failed_item_has_its_exit_code_and_error(tmp_path, rc, result):
    (tmp_path / "pretrain.out").write_text("step 1\n")
    (tmp_path / "pretrain.err").write_text("Traceback (most recent call last):\n  File x\n"
                                           "RuntimeError: CUDA error: no kernel image\n"
                                           "UserWarning: something harmless\n")
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check_row.py", "--item", "pretrain", "--rc", rc,
         "--seconds", "31", "--cap", "30", "--work", str(tmp_path), "--results",
         str(tmp_path / "results.jsonl"), "--label", "pretrain", "--shapes", "tiny"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"| pretrain | tiny | {result} | 31 |  |\n"
    record = json.loads((tmp_path / "results.jsonl").read_text())
    assert record["status"] == {"1": "failed", "124": "timed out", "0": "failed"}[rc]


def test_code_shape_finds_cycles_and_the_package_has_none(tmp_path):
    """bench/code_shape.py's import graph: it finds a cycle where there is one (a deferred
    import counts), and the package has none; its report prints every section."""
    sys.path.insert(0, str(ROOT / "bench"))
    import code_shape

    assert code_shape.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [("a", "b", "c")]
    assert code_shape.cycles({"a": {"b"}, "b": set()}) == []
    deferred = code_shape.ast.parse("def f():\n    from .b import x\nfrom . import c\n")
    assert code_shape.imports("clm/a.py", deferred) >= {"clm.b", "clm.c"}
    nested = code_shape.ast.parse("from ..errors import E\nfrom .base import B\n")
    assert code_shape.imports("clm/parallel/ddp.py", nested) >= {"clm.errors",
                                                                 "clm.parallel.base"}
    proc = subprocess.run([sys.executable, "bench/code_shape.py"], cwd=ROOT, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "## import cycles: 0\n" in proc.stdout
    for section in ("## lines per module", "## longest functions",
                    "## modules an option passes through", "--per_device_train_batch_size"):
        assert section in proc.stdout


def test_only_the_launch_module_reads_ranks_from_the_environment():
    """Topology is made once from the launcher (clm/parallel/launch.py) and passed along: no
    other module of the package reads RANK / WORLD_SIZE / LOCAL_RANK or asks torch.distributed
    for its rank or world size."""
    readers = re.compile(r"environ(\.get)?\(?\[?[\"'](RANK|WORLD_SIZE|LOCAL_RANK|"
                         r"LOCAL_WORLD_SIZE|GROUP_RANK)[\"']|get_rank\(\)|get_world_size\(\)")
    found = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "clm").rglob("*.py"))
             if readers.search(p.read_text())]
    assert found == ["clm/parallel/launch.py"]


@pytest.mark.slow
def test_learning_efficiency_recipe_table(tmp_path, corpus_dir, tokenizer_dir):
    """--compare recipes: each recipe's grid, its best on every seed, the fractions of the
    tokens, and the runs kept in --results (a rerun trains nothing again)."""
    results = tmp_path / "runs.jsonl"
    cmd = [sys.executable, "bench/learning_efficiency.py", "--compare", "recipes",
           "--recipes", "adamw_cosine,muon_wsd", "--config",
           str(write_config(tmp_path, corpus_dir, tokenizer_dir)), "--sizes", "tiny", "--seeds",
           "2", "--max_steps", "4", "--batch_size", "4", "--block_size", "32", "--results",
           str(results), "--", "--shuffle_buffer_blocks", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):proc.stdout.rindex("}") + 1])
    adamw, muon = result["recipes"]["adamw_cosine"], result["recipes"]["muon_wsd"]
    assert list(adamw["grid"]["learning_rate"]) == ["0.001", "0.002", "0.004", "0.008"]
    assert list(muon["grid"]["muon_lr_ratio"]) == ["0.5", "1.0", "2.0", "4.0"]
    assert "--optim" in muon["options"] and "warmup_stable_decay" in muon["options"]
    assert len(adamw["losses_by_seed"]) == 2 and result["target"] == pytest.approx(
        sum(adamw["losses_by_seed"]) / 2, abs=1e-4)
    assert set(muon["loss_at_fraction"]) >= {"0.35", "0.5", "0.7", "1.0"}
    rows = [x for x in proc.stdout.splitlines() if x.startswith(("adamw_cosine ", "muon_wsd "))]
    assert len(rows) == 2 and rows[0].endswith("1.00x"), rows
    runs = len(results.read_text().splitlines())
    assert runs >= 4 + 1 + 4 + 1 + 3  # grids, second seeds, fractions
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and len(results.read_text().splitlines()) == runs
    assert "train:" not in again.stderr, "every run read back, none trained"


def test_tokens_to_reach_interpolates_between_fractions():
    sys.path.insert(0, str(ROOT / "bench"))
    from learning_efficiency import tokens_to_reach

    assert tokens_to_reach(5.0, {0.5: 5.2, 0.7: 4.9, 1.0: 4.8}) == pytest.approx(0.5 + 0.2 * 2 / 3)
    assert tokens_to_reach(5.0, {0.5: 4.9, 1.0: 4.8}) == 0.5
    assert tokens_to_reach(4.0, {0.5: 4.9, 1.0: 4.8}) is None


@pytest.mark.slow
def test_train_throughput_compares_the_optimizers(tmp_path, corpus_dir, tokenizer_dir):
    result = train_throughput(tmp_path, corpus_dir, tokenizer_dir, "--compare_optimizers",
                              "--repeats", "1")
    assert result["adamw_torch"]["tokens_per_sec"] > 0 and result["muon"]["tokens_per_sec"] > 0
    steps = result["optimizer_step"]
    assert steps["step_ms"]["muon"] > 0 and steps["step_ms"]["adamw_torch"] > 0
    assert 0 < steps["muon_params"] < steps["params"]


@pytest.mark.slow
def test_chaos_bench_recovers_from_each_kind_of_fault(tmp_path):
    """bench/chaos.py with one fault of each kind: a kill from outside and a hang are
    recovered by torchrun's restart with the clean run's weights; a bad step is skipped."""
    results = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "chaos.py"), "--faults", "3",
                           "--work", str(tmp_path / "work"), "--results", str(results)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["fault"] for r in rows] == ["kill", "hang", "bad_step"]
    assert all(r["injected"] and r["recovered"] for r in rows)
    kill, hang, bad = rows
    assert kill["restarts"] == hang["restarts"] == 1 and bad["restarts"] == 0
    assert kill["identical"] and hang["identical"] and not bad["identical"]
    assert hang["hang_reported"] and bad["steps_skipped"] == 1
    assert 0 <= kill["steps_redone"] < 4 and 0 <= hang["steps_redone"] < 4
    assert "| all | 3 | 3 | 3 | 2 |" in proc.stdout
