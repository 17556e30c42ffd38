"""Task metrics from generation: greedy completions of held-out prompts, scored by `evaluate`.

    python finetune/run_sft.py --config configs/sft_demo.yaml --eval_metrics exact_match

At every evaluation (and at step 0, before any training) the first `--eval_generate_samples`
held-out records that have a prompt (prompt/completion records, or chats ending with an
assistant turn) are completed greedily, up to `--eval_max_new_tokens` tokens or the end token,
and each metric compares the completions with the records' own; its results are logged as
`eval_<key>` (`exact_match` gives `eval_exact_match`). Prompts are encoded exactly as training
encodes them (`sft.segments`), so the model is asked what it was taught to answer.

Metrics are `evaluate` modules: a name shipped in clm/eval_modules/ (exact_match), a local
module path, or any Hub metric when the Hub can be reached; all are loaded before training, so
an unknown one stops the run at once. Each rank completes its share of the prompts; the texts
are gathered so every rank computes the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .config import _help
from .errors import UsageError, first_line
from .parallel import Backend

LOCAL_MODULES = Path(__file__).resolve().parent / "eval_modules"


@dataclass
class GenerationEvalConfig:
    """Task metrics scored on greedy completions of held-out prompts."""

    eval_metrics: list[str] = field(default_factory=list, metadata={"help": (
        "Metrics of held-out completions, logged as eval_<metric> at every evaluation: "
        "evaluate modules by name (shipped offline: "
        f"{', '.join(sorted(p.name for p in LOCAL_MODULES.iterdir() if p.is_dir()))}; others "
        "from the Hub) or by local path.")})
    eval_generate_samples: int = _help("Held-out prompts completed for --eval_metrics.",
                                       default=64)
    eval_max_new_tokens: int = _help("Longest completion generated for --eval_metrics.",
                                     default=32)

    def __post_init__(self):
        self.eval_metrics = [m.strip() for item in self.eval_metrics or []
                             for m in item.split(",") if m.strip()]
        if self.eval_generate_samples < 1:
            raise UsageError(f"--eval_generate_samples must be >= 1 (got "
                             f"{self.eval_generate_samples})")
        if self.eval_max_new_tokens < 1:
            raise UsageError(f"--eval_max_new_tokens must be >= 1 (got "
                             f"{self.eval_max_new_tokens})")


def load_metric(name: str):
    """The `evaluate` module `name`: shipped, a local path, or from the Hub; else UsageError."""
    import evaluate

    shipped = LOCAL_MODULES / name
    where = str(shipped) if (shipped / f"{name}.py").is_file() else name
    try:
        return evaluate.load(where)
    except Exception as e:
        first = first_line(e)
        offline = ", ".join(sorted(p.name for p in LOCAL_MODULES.iterdir() if p.is_dir()))
        raise UsageError(f"could not load --eval_metrics {name}: {first[:200]} (offline "
                         f"metrics: {offline}; a local evaluate module path; Hub metrics need "
                         "the Hub)") from None


def prompts(records: list[dict], tokenizer, limit: int) -> list[dict]:
    """Up to `limit` {"prompt_ids", "reference"} from records whose last learned piece follows a
    prompt: the ids before it and its text (without special tokens)."""
    from .sft.templates import segments

    out = []
    for record in records:
        pieces = segments(record, tokenizer)
        if len(pieces) < 2 or not pieces[-1][1]:
            continue  # plain text, or a chat that does not end with the assistant
        prompt_ids = [t for ids, _ in pieces[:-1] for t in ids]
        reference = tokenizer.decode(pieces[-1][0], skip_special_tokens=True).strip()
        out.append({"prompt_ids": prompt_ids, "reference": reference})
        if len(out) == limit:
            break
    return out


def check_samples(samples: list[dict], cfg: GenerationEvalConfig, block_size: int) -> None:
    if cfg.eval_metrics and not samples:
        raise UsageError("--eval_metrics needs held-out records with a prompt ({prompt, "
                         "completion} records, or chats ending with an assistant turn); these "
                         "have none (or no held-out records: set --validation_files or "
                         "--validation_split_percentage)")
    longest = max((len(s["prompt_ids"]) for s in samples), default=0)
    if longest + cfg.eval_max_new_tokens > block_size:
        # generation past the trained length would be scored on positions never trained
        samples[:] = [s for s in samples
                      if len(s["prompt_ids"]) + cfg.eval_max_new_tokens <= block_size]
        if cfg.eval_metrics and not samples:
            raise UsageError(f"no held-out prompt leaves room for --eval_max_new_tokens "
                             f"{cfg.eval_max_new_tokens} within --block_size {block_size} "
                             "(lower --eval_max_new_tokens)")


@torch.no_grad()
def completions(model, tokenizer, samples: list[dict], max_new_tokens: int, batch_size: int,
                device, autocast=None, synced: bool = False) -> list[str]:
    """Greedy completions of `samples`' prompts, left-padded in batches, decoded to the end
    token without special tokens. `synced`: other ranks generate too (ZeRO-3 gathers weights
    in every forward pass, so all run until the longest finishes)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    texts = []
    for i in range(0, len(samples), batch_size):
        chunk = [s["prompt_ids"] for s in samples[i:i + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                            device=device)
        with autocast() if autocast else torch.autocast(device.type, enabled=False):
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=pad, synced_gpus=synced)
        for row in out[:, width:].tolist():
            row = row[:row.index(eos)] if eos in row else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


def generation_scores(model, tokenizer, samples: list[dict], metrics: dict, max_new_tokens: int,
                      batch_size: int, backend: Backend) -> dict:
    """{"eval_<key>": value} of every metric over `samples`, each rank generating its share
    (`model` unwrapped; in lockstep where the backend gathers weights per forward)."""
    rank, world = backend.topology.dp_rank, backend.topology.dp_world_size
    device, autocast = backend.device, backend.accelerator.autocast
    synced = backend.synced_generation()
    was_training = model.training
    model.eval()
    try:
        mine = samples[rank::world]
        # the same number of generate calls on every rank (ZeRO-3's forward is collective)
        calls = -(-len(samples[0::world]) // batch_size)
        texts = completions(model, tokenizer, mine, max_new_tokens, batch_size, device,
                            autocast, synced)
        for _ in range(calls - -(-len(mine) // batch_size)):
            completions(model, tokenizer, samples[:1], max_new_tokens, 1, device, autocast,
                        synced)
    finally:
        model.train(was_training)
    predictions = [(rank + world * i, t) for i, t in enumerate(texts)]
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    predictions = [t for _, t in sorted(predictions)]
    references = [s["reference"] for s in samples]
    results = {}
    for name, metric in metrics.items():
        for key, value in metric.compute(predictions=predictions, references=references).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                results[f"eval_{key}"] = float(value)
    return results


def make_eval(cfg: GenerationEvalConfig, tokenizer, records: list[dict], block_size: int,
              batch_size: int) -> Optional[callable]:
    """The function the loop calls at each evaluation, `fn(model, backend) -> dict`, or
    None without --eval_metrics; loads the metrics and picks the prompts now (errors first)."""
    if not cfg.eval_metrics:
        return None
    metrics = {name: load_metric(name) for name in cfg.eval_metrics}
    samples = prompts(records, tokenizer, cfg.eval_generate_samples)
    check_samples(samples, cfg, block_size)

    def run(model, backend: Backend) -> dict:
        inner = backend.accelerator.unwrap_model(model)
        return generation_scores(inner, tokenizer, samples, metrics, cfg.eval_max_new_tokens,
                                 batch_size, backend)
    return run
