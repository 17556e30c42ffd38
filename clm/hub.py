"""The Hub: the model card, and pushes from a background thread that training never waits on.

    HF_TOKEN=... python train_clm.py --config configs/demo_cpu.yaml --push_to_hub --hub_model_id me/demo

Each checkpoint's HF folder is pushed as one commit on its own branch (`step-<N>`, load it with
`from_pretrained(repo, revision="step-200")`), and the final folder with its model card to
`main`. Pushes run in a daemon thread with retries and exponential backoff; one that still fails
is reported and tried again at the next push, so a flaky network never stops or slows training.
The token comes from HF_TOKEN or `hf auth login`, is never an option, and is scrubbed from any
message we print.
"""

from __future__ import annotations

import math
import os
import queue
import shlex
import sys
import threading
import time
from pathlib import Path

FINAL_IGNORE = ["checkpoints/*", "wandb/*", "runs/*", ".*", "*/.*", "*.tmp"]
CHECKPOINT_IGNORE = ["state/*", "manifest.json", "trainer_state.json", ".*", "*.tmp"]


class HubPusher:
    """Push folders to one Hub repo from a background thread, with retries."""

    def __init__(self, repo_id: str, private: bool = False, retries: int = 4,
                 backoff_s: float = 2.0, log=print):
        from huggingface_hub import HfApi, get_token

        self.repo_id, self.private, self.retries, self.backoff_s = repo_id, private, retries, backoff_s
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        self._secret = get_token()
        self._log = log
        self._repo_ready = False
        self._queue: queue.Queue = queue.Queue()
        self.pending: list[tuple] = []   # jobs that failed every retry; tried again next time
        self.pushed: list[str] = []      # revisions pushed
        self._busy: list[str] = []       # folders queued or uploading: rotation leaves them
        self._lock = threading.Lock()
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="hub-push", daemon=True)
        self._thread.start()

    def push(self, folder: str | Path, revision: str, message: str, final: bool = False) -> None:
        with self._lock:
            self._busy.append(str(folder))
        self._queue.put((str(folder), revision, message, final))

    def busy(self) -> list[str]:
        """Folders queued or being uploaded now (not those waiting for a retry)."""
        with self._lock:
            return list(self._busy)

    def finish(self, timeout: float | None = None) -> bool:
        """Wait (at most `timeout` s) for queued pushes; True if nothing is left unpushed."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive() and not self.pending

    def finish_and_report(self, timeout: float | None = None) -> bool:
        """Finish (see `finish`) and say what was not pushed; once, whichever exit path asks."""
        if self._reported:
            return not self.pending
        self._reported = True
        ok = self.finish(timeout)
        if ok:
            self._say(f"hub: everything is pushed to {self.repo_id}")
        else:
            left = ", ".join(j[1] for j in self.pending) or "a push still running"
            self._say(f"hub: not pushed: {left} (the files are in the output folder; push them "
                      f"with `hf upload {self.repo_id} FOLDER`)")
        return ok

    def _say(self, message: str) -> None:
        if self._secret:
            message = message.replace(self._secret, "***")
        self._log(message)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            jobs, self.pending = self.pending + ([job] if job else []), []
            for j in jobs:
                if not Path(j[0]).is_dir():  # a checkpoint rotated away before its retry
                    self._say(f"hub: {j[0]} no longer exists; not pushing it")
                elif not self._push_with_retries(*j):
                    self.pending.append(j)
                with self._lock:
                    if j[0] in self._busy:
                        self._busy.remove(j[0])
            if job is None:
                return

    def _push_with_retries(self, folder: str, revision: str, message: str, final: bool) -> bool:
        for attempt in range(1, self.retries + 1):
            try:
                self._push_once(folder, revision, message, final)
                self.pushed.append(revision)
                self._say(f"hub: pushed {folder} to {self.repo_id}@{revision}")
                return True
            except Exception as e:  # network, server or auth: report, back off, retry
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self._say(f"hub: push of {revision} failed (attempt {attempt}/{self.retries}): "
                          f"{first}")
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
        self._say(f"hub: could not push {revision}; it will be tried again with the next push")
        return False

    def _push_once(self, folder: str, revision: str, message: str, final: bool) -> None:
        if not self._repo_ready:
            self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
            self._repo_ready = True
        if revision != "main":
            self.api.create_branch(self.repo_id, branch=revision, exist_ok=True)
        self.api.upload_folder(folder_path=folder, repo_id=self.repo_id, revision=revision,
                               commit_message=message,
                               ignore_patterns=FINAL_IGNORE if final else CHECKPOINT_IGNORE)


def model_card(run: dict) -> str:
    """README.md for a trained model folder, from the run's resolved config and results."""
    ds = run["data"]
    files = ds.get("train_files") or []
    files = [files] if isinstance(files, str) else files  # a YAML config may give one string
    data = ", ".join(files) or ds.get("dataset_name") or "local files"
    eval_loss = run.get("final_eval_loss")
    ppl = f"{math.exp(eval_loss):.2f}" if eval_loss is not None else "n/a"
    loss = f"{eval_loss:.4f}" if eval_loss is not None else "n/a"
    hub_dataset = ds.get("dataset_name") if not ds.get("train_files") and ds.get("dataset_name") \
        and "/" in ds["dataset_name"] and not ds["dataset_name"].startswith(("/", ".")) else None
    license_ = run["training"].get("license")
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            *([f"license: {license_}"] if license_ else []),
            "tags:", "- gpt2", "- causal-lm", f"- {run.get('task', 'pretraining')}"]
    if hub_dataset:
        meta += ["datasets:", f"- {hub_dataset}"]
    meta.append("---")
    m = run["model_info"]
    return "\n".join(meta) + f"""

# {run['name']}

A GPT-2-architecture causal language model ({m['n_layer']} layers, {m['n_head']} heads,
{m['n_embd']} dims, {m['n_positions']} positions, {m['params'] / 1e6:.1f}M parameters),
trained from {'`' + run['model'].get('model_name_or_path') + '`' if run['model'].get('model_name_or_path') else 'scratch'}.

| | |
|---|---|
| data | {data} |
| tokens seen | {run['tokens']:,} |
| optimizer steps | {run['step']:,} |
| global batch | {run['global_batch_sequences']} sequences x {ds['block_size']} tokens |
| final eval loss | {loss} |
| final eval perplexity | {ppl} |
| world size | {run['world_size']} |
| wall time | {run['elapsed_s']:.0f} s |

![loss curve](loss_curve.png)

## Usage

```python
from transformers import pipeline
generator = pipeline("text-generation", model="{run['training'].get('hub_model_id') or run['training']['output_dir']}")
print(generator("The", max_new_tokens=40, do_sample=True)[0]["generated_text"])
```

## Training command

```bash
{run['command']}
```

Full configuration: `run_config.yaml`; per-step metrics: `metrics.jsonl`.
"""


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1]] + sys.argv)

