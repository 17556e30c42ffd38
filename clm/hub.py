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
import re
import shlex
import sys
import threading
import time
from pathlib import Path

from .errors import first_line
from .record import RunRecord

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
                self._say(f"hub: pushed {folder} to {self.repo_id}@{revision}")
                return True
            except Exception as e:  # network, server or auth: report, back off, retry
                first = first_line(e)
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


# The card's YAML header, in this order (the Hub shows it as written).
CARD_KEYS = ["library_name", "pipeline_tag", "license", "base_model", "datasets", "tags",
             "model_name", "eval_results"]
# Keys of RunRecord.final_eval that are not extra metrics: the loss is final_eval_loss's.
LOSS_KEYS = ("eval_loss", "eval_ppl", "eval_perplexity")
# ... nor are counts and timings: eval_hellaswag_n (examples scored), Trainer's eval_runtime.
NOT_METRICS = ("n", "runtime", "samples_per_second", "steps_per_second")
LOSS_LABEL, PPL_LABEL = "final eval loss", "final eval perplexity"
HELLASWAG = {"dataset_type": "Rowan/hellaswag", "dataset_name": "HellaSwag",
             "dataset_split": "validation"}
METRIC_NAMES = {"loss": "Loss", "perplexity": "Perplexity", "exact_match": "Exact match",
                "acc": "Accuracy", "acc_norm": "Normalized accuracy (per token, as llm.c)",
                "acc_norm_char": "Normalized accuracy (per character: lm-eval's acc_norm)"}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def hub_name(name) -> str | None:
    """`name` when the Hub can resolve it (`gpt2`, `user/data`), None for a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or not _REPO_ID.match(name) or os.path.exists(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _as_list(files) -> list[str]:
    """A config's file globs: a YAML config may give one string."""
    return [files] if isinstance(files, str) else list(files or [])


def _number(value) -> float | None:
    """A metric's value, or None for a missing, non-numeric or non-finite one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value):
        return None
    return value


def _builder(files: list[str]) -> str:
    """The `datasets` builder that reads these files (load_dataset("json", data_files=...))."""
    kinds = {{"txt": "text", "jsonl": "json", "json": "json", "parquet": "parquet"}.get(
        f.rsplit(".", 1)[-1].lower(), "text") for f in files}
    return kinds.pop() if len(kinds) == 1 else "text"


def heldout_dataset(run: RunRecord) -> dict:
    """EvalResult's dataset fields for the held-out set that the eval loss is measured on."""
    ds = run.data
    val, train = _as_list(ds.get("validation_files")), _as_list(ds.get("train_files"))
    hub = None if train else hub_name(ds.get("dataset_name"))
    if val:
        return {"dataset_type": _builder(val), "dataset_name": ", ".join(val),
                "dataset_split": "validation"}
    if hub:  # its validation split, or a hash carve of its documents
        return {"dataset_type": hub, "dataset_name": hub,
                "dataset_config": ds.get("dataset_config_name"),
                "dataset_revision": ds.get("dataset_revision")}
    files = train or [ds.get("dataset_name") or "local files"]
    return {"dataset_type": _builder(files),
            "dataset_name": f"held-out part of {', '.join(files)}"}


def final_loss(run: RunRecord) -> float | None:
    """The last eval loss: run.final_eval_loss, else run.final_eval["eval_loss"]."""
    loss = run.final_eval_loss
    return _number(run.final_eval.get("eval_loss") if loss is None else loss)


def eval_results(run: RunRecord) -> list[tuple[str, object]]:
    """(table label, EvalResult) for every final evaluation result that has a value.

    The eval loss and perplexity come from run.final_eval_loss; every other metric from
    run.final_eval, a dict {"eval_<name>": value} (the eval records' names in
    metrics.jsonl; other keys, counts like eval_hellaswag_n and timings are ignored, None or
    non-finite values skipped): eval_exact_match -> exact_match, eval_hellaswag_<m> -> <m> on
    HellaSwag's validation split, eval_<task>_<m> of an lm-eval --eval_tasks task -> <m> on
    that task, any other eval_<name> -> <name>, all on the task text-generation.
    """
    from huggingface_hub import EvalResult

    heldout = heldout_dataset(run)
    extra = run.final_eval
    # longest first, so that a task whose name extends another's is matched whole
    harness_tasks = sorted((t for t in (run.options.get("evaluation") or {}).get("eval_tasks")
                            or [] if t != "hellaswag"), key=len, reverse=True)
    loss = final_loss(run)

    def result(metric: str, value, dataset: dict) -> object:
        return EvalResult(task_type="text-generation", task_name="Text Generation",
                          metric_type=metric, metric_name=METRIC_NAMES.get(metric, metric),
                          metric_value=value, **dataset)

    out = []
    if loss is not None:
        out.append((LOSS_LABEL, result("loss", loss, heldout)))
        ppl = _number(math.exp(min(loss, 700)))
        if ppl is not None:
            out.append((PPL_LABEL, result("perplexity", ppl, heldout)))
    for key, value in extra.items():
        value = _number(value)
        if not key.startswith("eval_") or key in LOSS_KEYS or value is None:
            continue
        name = key[len("eval_"):]
        if any(name == x or name.endswith("_" + x) for x in NOT_METRICS):
            continue
        task = next((t for t in harness_tasks if name.startswith(t + "_")), None)
        if name.startswith("hellaswag_") and len(name) > len("hellaswag_"):
            metric = name[len("hellaswag_"):]
            out.append((f"HellaSwag {metric}", result(metric, value, HELLASWAG)))
        elif task:  # an lm-evaluation-harness task's metric, on that task's data
            metric = name[len(task) + 1:]
            out.append((f"{task} {metric}", result(metric, value, {
                "dataset_type": task, "dataset_name": f"{task} (lm-evaluation-harness)"})))
        else:
            out.append((f"eval {name.replace('_', ' ')}", result(name, value, heldout)))
    return out


def model_card(run: RunRecord) -> str:
    """README.md for a trained model folder, from the run's resolved config and results.

    The YAML header is huggingface_hub's ModelCardData (eval results as a model-index); the
    body names what the header cannot: local data files and a local base model.
    """
    from huggingface_hub import ModelCard, ModelCardData

    ds, m = run.data, run.model_info
    files = _as_list(ds.get("train_files"))
    data = ", ".join(files) or ds.get("dataset_name") or "local files"
    hub_dataset = None if files else hub_name(ds.get("dataset_name"))
    base = run.model.get("model_name_or_path")
    hub_base = hub_name(base) if base else None
    results = eval_results(run)
    meta = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        license=run.training.get("license") or None, base_model=hub_base,
        datasets=[hub_dataset] if hub_dataset else None,
        tags=["gpt2", "causal-lm", run.task], model_name=run.name,
        eval_results=[r for _, r in results] or None)

    eval_loss = final_loss(run)
    loss = f"{eval_loss:.4f}" if eval_loss is not None else "n/a"
    ppl = f"{math.exp(min(eval_loss, 700)):.2f}" if eval_loss is not None else "n/a"
    rows = "".join(f"| {label} | {r.metric_value:.4f} |\n" for label, r in results
                   if label not in (LOSS_LABEL, PPL_LABEL))
    val = _as_list(ds.get("validation_files"))
    val_row = f"| held-out data | {', '.join(val)} |\n" if val else ""
    if not base:
        origin = "trained from scratch."
        base_line = ""
    else:
        origin = "trained from the weights of its base model:"
        base_line = (f"\n**Base model:** [`{hub_base}`](https://huggingface.co/{hub_base})\n"
                     if hub_base else f"\n**Base model:** `{base}` (a local folder, not on the "
                     "Hub)\n")
    body = f"""
# {run.name}

A GPT-2-architecture causal language model ({m.n_layer} layers, {m.n_head} heads,
{m.n_embd} dims, {m.n_positions} positions, {m.params / 1e6:.1f}M parameters),
{origin}
{base_line}
| | |
|---|---|
| data | {data} |
{val_row}| tokens seen | {run.tokens:,} |
| optimizer steps | {run.step:,} |
| global batch | {run.global_batch_sequences} sequences x {ds['block_size']} tokens |
| final eval loss | {loss} |
| final eval perplexity | {ppl} |
{rows}| world size | {run.world_size} |
| wall time | {run.elapsed_s:.0f} s |

![loss curve](loss_curve.png)

## Usage

```python
from transformers import pipeline
generator = pipeline("text-generation", model="{run.training.get('hub_model_id') or run.training['output_dir']}")
print(generator("The", max_new_tokens=40, do_sample=True)[0]["generated_text"])
```

## Training command

```bash
{run.command}
```

Full configuration: `run_config.yaml`; per-step metrics: `metrics.jsonl`.
"""
    header = meta.to_yaml(original_order=CARD_KEYS)
    return ModelCard(f"---\n{header}\n---\n{body}").content


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable.rsplit("/", 1)[-1]] + sys.argv)

