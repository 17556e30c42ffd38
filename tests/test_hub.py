"""Hub pushes against a local fake Hub: uploads land, failures are retried, no secret leaks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fake_hub import FakeHub
from helpers import ROOT, toy_args

SECRET = "hf_TESTsecretTOKEN0123456789abcdef"


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_rotation_spares_folders_being_uploaded(tmp_path, monkeypatch):
    import threading

    from clm import checkpoint as ckpt
    from clm.hub import HubPusher

    monkeypatch.setenv("HF_TOKEN", SECRET)
    release, started = threading.Event(), threading.Event()
    pushed = []

    def slow_push(self, folder, revision, message, final):
        started.set()
        release.wait(30)
        pushed.append(revision)

    monkeypatch.setattr(HubPusher, "_push_once", slow_push)
    out = tmp_path / "run"
    for step in (2, 4, 6):  # three complete checkpoints
        folder = ckpt.checkpoint_root(out) / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / ckpt.MANIFEST).write_text('{"step": %d, "files": {}}' % step)
    pusher = HubPusher("me/toy", log=lambda m: None)
    pusher.push(ckpt.checkpoint_root(out) / "step-2", "step-2", "checkpoint at step 2")
    assert started.wait(10)
    busy = pusher.busy()
    assert busy == [str(ckpt.checkpoint_root(out) / "step-2")]
    assert [p.name for p in ckpt.rotate(out, 1, keep=busy)] == ["step-4"], "step-2 is uploading"
    release.set()
    assert pusher.finish_and_report(timeout=10) and pushed == ["step-2"]
    assert pusher.busy() == []
    assert [p.name for p in ckpt.rotate(out, 1, keep=pusher.busy())] == ["step-2"]


def test_queued_pushes_are_finished_when_training_fails(tmp_path, corpus_dir, tokenizer_dir,
                                                        toy_config_dir, monkeypatch, capsys):
    import pytest

    from clm import checkpoint as ckpt
    from clm.hub import HubPusher
    from helpers import run

    monkeypatch.setenv("HF_TOKEN", SECRET)
    pushed = []
    monkeypatch.setattr(HubPusher, "_push_once",
                        lambda self, folder, revision, message, final: pushed.append(revision))
    real, calls = ckpt.save_model_folder, {"n": 0}

    def fails_second_time(model, tokenizer, dest):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(model, tokenizer, dest)

    monkeypatch.setattr(ckpt, "save_model_folder", fails_second_time)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=6, save_steps=2,
                     eval_steps=0, num_samples=0, push_to_hub="true", hub_model_id="me/toy"))
    assert e.value.code == 2
    printed = capsys.readouterr().out
    assert pushed == ["step-2"], "the push queued before the error was finished"
    assert "hub: everything is pushed to me/toy" in printed
