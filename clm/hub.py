"""The model card written beside every final model (and pushed with it to the Hub).

    python -c "from clm.hub import model_card; help(model_card)"
"""

from __future__ import annotations

import math
import shlex
import sys


def model_card(run: dict) -> str:
    """README.md for a trained model folder, from the run's resolved config and results."""
    ds = run["data"]
    data = ", ".join(ds.get("train_files") or []) or ds.get("dataset_name") or "local files"
    eval_loss = run.get("final_eval_loss")
    ppl = f"{math.exp(eval_loss):.2f}" if eval_loss is not None else "n/a"
    loss = f"{eval_loss:.4f}" if eval_loss is not None else "n/a"
    hub_dataset = ds.get("dataset_name") if not ds.get("train_files") and ds.get("dataset_name") \
        and "/" in ds["dataset_name"] and not ds["dataset_name"].startswith(("/", ".")) else None
    meta = ["---", "library_name: transformers", "pipeline_tag: text-generation",
            "tags:", "- gpt2", "- causal-lm", "- pretraining"]
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
generator = pipeline("text-generation", model="PATH_OR_REPO")
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

