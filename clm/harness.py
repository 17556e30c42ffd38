"""lm-evaluation-harness tasks at each evaluation of a run (`--eval_tasks`, lm-eval installed).

    python train_clm.py --config configs/demo_cpu.yaml --eval_tasks hellaswag,demo_choice,demo_perplexity,demo_generate --eval_tasks_data_files hellaswag_val.jsonl

Any task name other than the built-in `hellaswag` (clm.evaluate) is lm-eval's: one of its
registry, one of the tasks shipped here (`clm/eval_tasks/`: demo_choice, a multiple choice;
demo_perplexity, rolling log-likelihood; demo_generate, greedy generation and exact match;
all over small made-up local files, so they run offline), or a YAML in
`--eval_tasks_include_path`. The names are checked, and lm-eval's presence too, before any
training. At each evaluation the in-memory model is handed to lm-eval's `HFLM` (the whole
model: gathered first where the backend shards it), evaluated on the main process under the
run's autocast, and put back in training mode; the global RNG states are kept as they were, so
a run with tasks trains as it would without them. Each numeric metric is logged as
eval_<task>_<metric>.

`write_tasks(folder)` writes the shipped tasks with their data paths filled in, for lm-eval's
own command line (`lm_eval --model hf --model_args pretrained=outputs/demo --tasks
demo_choice --include_path folder`).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError
from .model import eval_mode

SHIPPED = Path(__file__).parent / "eval_tasks"


def write_tasks(folder) -> Path:
    """The shipped task YAMLs in `folder`, their `{data_dir}` made this package's folder (lm-eval
    reads a task's data_files relative to the working directory, not to the YAML)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for path in sorted(SHIPPED.glob("*.yaml")):
        (folder / path.name).write_text(path.read_text().replace("{data_dir}", str(SHIPPED)))
    return folder


def task_manager(include_path: str | None = None):
    """lm-eval's TaskManager over its registry, the shipped tasks and `include_path`; a
    UsageError naming the way to install it where lm-eval is missing."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError("--eval_tasks: tasks other than hellaswag run through "
                         "lm-evaluation-harness, which is not installed (pip install "
                         "'lm-eval>=0.4.13', the [lm_eval] extra)") from None
    shipped = write_tasks(tempfile.mkdtemp(prefix="clm-eval-tasks-"))
    atexit.register(shutil.rmtree, shipped, True)
    paths = [str(shipped)] + ([include_path] if include_path else [])
    return TaskManager(include_path=paths, verbosity="ERROR")


def check_tasks(names: list[str], include_path: str | None):
    """The TaskManager that knows every one of `names`, or a one-line UsageError."""
    if include_path and not Path(include_path).is_dir():
        raise UsageError(f"--eval_tasks_include_path {include_path}: no such folder (a folder "
                         "of lm-eval task YAMLs)")
    manager = task_manager(include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown --eval_tasks {','.join(unknown)} (not hellaswag, a shipped "
                         "task (demo_choice, demo_perplexity, demo_generate) or an lm-eval task; "
                         "add a folder of task YAMLs with --eval_tasks_include_path)")
    return manager


@contextlib.contextmanager
def kept_rng_states():
    """Python's, numpy's and torch's global RNG states as they were, whatever runs inside."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]
                               if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def make_harness_eval(names: list[str], include_path: str | None, tokenizer, batch_size: int,
                      limit: int | None):
    """`fn(model, backend) -> {"eval_<task>_<metric>": value}` running lm-eval's `names`;
    checked now (lm-eval installed, every task known)."""
    manager = check_tasks(names, include_path)
    tokenizer = copy.deepcopy(tokenizer)  # lm-eval may give it a pad token: not the run's

    def run(model, backend) -> dict:
        accelerator = backend.accelerator
        # collective where sharded: every rank takes part, the main process gets the model
        whole = backend.full_model(model) if backend.shards_parameters else \
            accelerator.unwrap_model(model)
        results = {}
        if backend.topology.is_main:
            with eval_mode(whole), kept_rng_states(), accelerator.autocast():
                results = evaluate_tasks(whole, tokenizer, names, manager, batch_size, limit,
                                         next(whole.parameters()).device)
        if backend.topology.distributed:
            box = [results]
            torch.distributed.broadcast_object_list(box, src=0)
            results = box[0]
        return results

    return run


def evaluate_tasks(model, tokenizer, names: list[str], manager, batch_size: int,
                   limit: int | None, device) -> dict:
    """{"eval_<task>_<metric>": value} of lm-eval's simple_evaluate on an in-memory model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device),
              max_length=getattr(model.config, "n_positions", None))
    out = simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit,
                          log_samples=False, bootstrap_iters=0, verbosity="ERROR",
                          random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    results = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric = key.split(",")[0]
            if metric.endswith("_stderr") or isinstance(value, bool) or \
                    not isinstance(value, (int, float)):
                continue
            results[f"eval_{task}_{metric}"] = float(value)
    return results
