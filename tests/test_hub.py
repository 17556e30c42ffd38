"""Hub pushes against a local fake Hub: uploads land, failures are retried, no secret leaks."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from fake_hub import FakeHub
from helpers import ROOT, toy_args

SECRET = "hf_TESTsecretTOKEN0123456789abcdef"


def test_push_with_injected_failures(tmp_path, corpus_dir, tokenizer_dir, toy_config_dir):
    out = tmp_path / "run"
    args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=6, save_steps=3,
                    eval_steps=3, num_samples=1, push_to_hub="true", hub_model_id="me/toy",
                    license="mit")
    with FakeHub() as hub:
        hub.fail_commits = 2  # the first two commits fail: retried with backoff
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": SECRET,
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "2"}
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.run([sys.executable, str(ROOT / "train_clm.py"), *args], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert hub.failed == 2 and "failed (attempt 1/4)" in proc.stdout
        assert "hub: everything is pushed to me/toy" in proc.stdout
        landed = {(c["revision"], c["message"]): c["files"] for c in hub.commits}
        assert set(landed) == {("step-3", "checkpoint at step 3"),
                               ("step-6", "checkpoint at step 6"),
                               ("main", "final model at step 6")}
        ckpt_files = landed[("step-3", "checkpoint at step 3")]
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(ckpt_files)
        assert not any(f.startswith("state/") for f in ckpt_files), "no optimizer state pushed"
        final = landed[("main", "final model at step 6")]
        assert {"README.md", "model.safetensors", "loss_curve.png", "metrics.jsonl"} <= set(final)
        assert not any(f.startswith("checkpoints/") for f in final)
        assert final["model.safetensors"] == (out / "model.safetensors").read_bytes()
        card = final["README.md"].decode()
        assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: text-generation")
        assert "license: mit" in card and "loss_curve.png" in card and "me/toy" in card
        assert f"Bearer {SECRET}" in hub.auth_headers, "the token was used"
        assert set(hub.auth_headers) <= {f"Bearer {SECRET}", ""}
    # the token is nowhere in what the run wrote or printed
    assert SECRET not in proc.stdout + proc.stderr
    for f in Path(tmp_path).rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert "hub_token" not in yaml.safe_load((out / "run_config.yaml").read_text())["training"]


def test_push_that_keeps_failing_does_not_stop_training(tmp_path, corpus_dir, tokenizer_dir,
                                                        toy_config_dir):
    out = tmp_path / "run"
    args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=4, save_steps=2,
                    eval_steps=0, num_samples=0, push_to_hub="true", hub_model_id="me/toy")
    with FakeHub() as hub:
        hub.fail_commits = 4  # every retry of the step-2 push fails; step-4's push retries it
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": SECRET,
               "HF_HUB_DISABLE_XET": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        proc = subprocess.run([sys.executable, str(ROOT / "train_clm.py"), *args], env=env,
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (out / "model.safetensors").is_file(), "training finished"
        assert "could not push step-2; it will be tried again" in proc.stdout
        assert sorted(c["revision"] for c in hub.commits) == ["main", "step-2", "step-4"]
