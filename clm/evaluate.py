"""Zero-shot benchmarks for any model folder this project writes (final, checkpoint, LoRA) or a Hub name.

    python -m clm.evaluate --model outputs/demo --tasks hellaswag --limit 500

HellaSwag (https://rowanzellers.com/hellaswag): each example is a context `ctx` and 4 `endings`,
one of them right (`label`). Each ending is scored as `" " + ending` appended to the context:
`acc` picks the ending with the highest summed log-likelihood of its tokens given the context,
`acc_norm` the highest mean log-likelihood per ending token (as llm.c reports it), and
`acc_norm_char` the highest log-likelihood per character of the ending, which is what
lm-evaluation-harness calls acc_norm (the per-ending log-likelihoods are lm-eval's:
tests/test_evaluate.py runs both on the same items). The data is
the validation split of Rowan/hellaswag (10,042 examples, from the Hub), or `--data_files FILE`:
JSON lines in the same format, {"ctx": str, "endings": [4 str], "label": 0-3 (or "0"-"3")}.
A context + ending longer than the model's context window loses tokens from the left of the
context, as in lm-eval (the window holds the last n_positions + 1 tokens, the last of which is
only predicted); the ending is kept whole.

The last line of stdout is JSON: {"hellaswag": {"acc": .., "acc_norm": .., "acc_norm_char": ..,
"n": ..}}.

Sequences are scored in batches of `--batch_size` (4 per example), right-padded: a causal
model's position t sees only positions <= t, so the padding after a sequence never reaches its
own tokens, and positions start at 0 as they would alone. Log-probabilities are taken in float32
from the logits, whatever the model's dtype. Under torchrun (or when the caller has initialised
torch.distributed) each rank scores examples[rank::world] and the counts are summed over ranks.
The training loop calls `hellaswag_scores` the same way at each evaluation.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from clm.config import _help, run_cli
from clm.errors import UsageError, first_line
from clm.model import eval_mode
from clm.parallel.launch import Topology, close_distributed

HELLASWAG_HUB = "Rowan/hellaswag"
TASKS = ("hellaswag",)
RECORD_FIX = ("each line must be one JSON object {\"ctx\": str, \"endings\": [4 strings], "
              "\"label\": 0-3}, as in Rowan/hellaswag")


@dataclass
class EvalConfig:
    """Which model, which benchmarks, on what data."""

    model: Optional[str] = _help("Model folder (final, checkpoints/step-N or LoRA adapters) or "
                                 "Hub name.", default=None)
    tasks: list[str] = field(default_factory=lambda: ["hellaswag"], metadata={
        "help": f"Benchmarks to run (comma- or space-separated): {', '.join(TASKS)}."})
    data_files: Optional[str] = _help(
        "Local HellaSwag data: a JSON-lines file of {ctx, endings, label} records (default: "
        f"the validation split of {HELLASWAG_HUB} from the Hub).", default=None)
    limit: Optional[int] = _help("Score only the first N examples (default: all).",
                                 default=None)
    batch_size: int = _help("Sequences per forward pass (4 per example).", default=32)
    device: str = _help("auto (CUDA if available), cpu or cuda.", default="auto")
    dtype: str = _help("auto (bf16 on CUDA where supported, else fp32), float32, bfloat16 or "
                       "float16. Log-probabilities are always taken in float32.", default="auto")

    def __post_init__(self):
        if not self.model:
            raise UsageError("--model is required (a folder written by train_clm.py or "
                             "run_sft.py, a checkpoint folder, or a Hub name)")
        self.tasks = [t.strip() for item in self.tasks for t in item.split(",") if t.strip()]
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise UsageError(f"unknown --tasks {','.join(unknown) or '(none)'} "
                             f"(choose from: {', '.join(TASKS)})")
        checks = [(self.limit is None or self.limit >= 1, "--limit must be >= 1 (or left out "
                   "for all examples)"),
                  (self.batch_size >= 1, "--batch_size must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        from clm.sampling import check_device

        check_device(self.device, self.dtype)


# ----------------------------------------------------------------------------- data

def _check_record(record, where: str) -> dict:
    """The record as {ctx, endings, label: int}, or a UsageError naming `where` and the field."""
    if not isinstance(record, dict):
        raise UsageError(f"{where} is a JSON {type(record).__name__}, not an object "
                         f"({RECORD_FIX})")
    for name in ("ctx", "endings", "label"):
        if name not in record:
            raise UsageError(f"{where} has no '{name}' field ({RECORD_FIX})")
    ctx, endings, label = record["ctx"], record["endings"], record["label"]
    if not isinstance(ctx, str) or not ctx:
        raise UsageError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r:.40} "
                         f"({RECORD_FIX})")
    if not isinstance(endings, list) or len(endings) != 4 or \
            not all(isinstance(e, str) for e in endings):
        got = f"a list of {len(endings)}" if isinstance(endings, list) and len(endings) != 4 \
            else (f"a {type(endings).__name__}" if not isinstance(endings, list)
                  else "a list with non-string items")
        raise UsageError(f"{where}: 'endings' must be a list of 4 strings, got {got} "
                         f"({RECORD_FIX})")
    if isinstance(label, str) and label.strip().isdigit():
        value = int(label)
    elif isinstance(label, int) and not isinstance(label, bool):
        value = label
    else:
        raise UsageError(f"{where}: 'label' must be an integer 0-3 (or a numeric string), got "
                         f"{label!r:.40} ({RECORD_FIX})")
    if not 0 <= value <= 3:
        raise UsageError(f"{where}: 'label' {label!r} is out of range (use 0-3, the index of "
                         "the right ending)")
    return {"ctx": ctx, "endings": list(endings), "label": value}


def _read_jsonl(path: str, limit: Optional[int]) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--data_files {path}: no such file (pass a JSON-lines file of "
                         "HellaSwag records, or leave it out to read the Hub's)")
    examples = []
    with file.open(encoding="utf-8", errors="strict") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"--data_files {path} line {number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{where} is not valid JSON: {e.msg} at column {e.colno} "
                                     f"({RECORD_FIX})") from None
                examples.append(_check_record(record, where))
                if limit is not None and len(examples) >= limit:
                    break
        except UnicodeDecodeError:
            raise UsageError(f"--data_files {path} is not UTF-8 text (pass a JSON-lines file of "
                             "HellaSwag records)") from None
    if not examples:
        raise UsageError(f"--data_files {path} holds no records ({RECORD_FIX})")
    return examples


def _read_hub(limit: Optional[int]) -> list[dict]:
    from datasets import load_dataset

    errors = []
    for revision in (None, "refs/convert/parquet"):  # the Hub's parquet copy, if main has a script
        try:
            data = load_dataset(HELLASWAG_HUB, split="validation", revision=revision)
            break
        except Exception as e:  # network, offline mode, a script the library no longer runs
            errors.append(first_line(e))
    else:
        raise UsageError(f"could not load {HELLASWAG_HUB} from the Hub: {errors[0]} (check the "
                         "network and HF_HUB_OFFLINE, or pass --data_files FILE with the "
                         "validation records as JSON lines)")
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return [_check_record(dict(r), f"{HELLASWAG_HUB} validation record {i}")
            for i, r in enumerate(data)]


def load_hellaswag(data_files: Optional[str] = None, limit: Optional[int] = None) -> list[dict]:
    """HellaSwag examples as [{"ctx": str, "endings": [4 str], "label": int}], the first `limit`:
    from `data_files` (JSON lines) when given, else the validation split of Rowan/hellaswag.
    A bad file or record is a UsageError naming the file, the line and the field."""
    if limit is not None and limit < 1:
        raise UsageError("--limit must be >= 1 (or left out for all examples)")
    return _read_jsonl(data_files, limit) if data_files else _read_hub(limit)


# ----------------------------------------------------------------------------- scoring

def _inner(model):
    """The model under DDP / DeepSpeed (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    inner = getattr(model, "module", model)
    return getattr(inner, "_orig_mod", inner)


def _context_window(model) -> Optional[int]:
    config = _inner(model).config
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def encode_hellaswag(tokenizer, examples: list[dict], max_len: Optional[int] = None):
    """Per example, 4 (token ids of ctx + " " + ending, number of ending tokens scored).

    Context and ending are tokenized apart and joined, so the ending's tokens are the same
    whatever the context. Past `max_len` + 1 tokens (the last token is predicted, never fed)
    the context is cut from the left; an ending that alone fills the window keeps its last
    max_len + 1 tokens, the first of them unscored."""
    if not examples:
        return []
    ctxs = tokenizer([e["ctx"] for e in examples], add_special_tokens=False)["input_ids"]
    ends = tokenizer([" " + x for e in examples for x in e["endings"]],
                     add_special_tokens=False)["input_ids"]
    out = []
    for i, ctx in enumerate(ctxs):
        seqs = []
        for end in ends[4 * i:4 * i + 4]:
            ids = list(ctx) + list(end)
            if max_len and len(ids) > max_len + 1:
                ids = ids[-(max_len + 1):]
            scored = min(len(end), len(ids) - 1)
            if scored < 1:
                raise ValueError(f"example {i}: an ending gives no token to score")
            seqs.append((ids, scored))
        out.append(seqs)
    return out


def _sequence_logprobs(model, seqs, batch_size: int, device, autocast=None, passes: int = 0,
                       filler=None) -> list[float]:
    """Summed log-probability of each sequence's scored (last) tokens, in input order. A
    sequence is fed without its last token, which only the logits before it predict.

    Longest first, `batch_size` sequences a pass, right-padded, no attention mask (see the
    module docstring). At least `passes` forward passes are run, the extra ones on `filler`
    and not counted: under ZeRO-3 (weights gathered in each pass) and DDP (buffers broadcast)
    every rank must run as many as the others."""
    order = sorted(range(len(seqs)), key=lambda k: -len(seqs[k][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sums, where = [], []
    for b in range(max(passes, len(batches))):
        counted = b < len(batches)
        rows = [seqs[k] for k in batches[b]] if counted else [filler]
        width = max(len(ids) for ids, _ in rows) - 1
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)  # pad id: never attended to
        targets = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, scored) in enumerate(rows):
            n = len(ids)
            input_ids[r, :n - 1] = torch.tensor(ids[:-1])
            # the logits at position t predict token t+1: the scored tokens are the last ones
            targets[r, n - 1 - scored:n - 1] = torch.tensor(ids[n - scored:])
        with (autocast() if autocast else nullcontext()):
            out = model(input_ids=input_ids.to(device), use_cache=False)
        logits = out.logits if hasattr(out, "logits") else out[0]
        targets = targets.to(device)
        keep = targets != -100
        # only the scored positions go to float32: a small slice of the (batch, len, vocab) logits
        logp = logits[keep].float().log_softmax(-1)
        token_lp = logp.gather(1, targets[keep].unsqueeze(1)).squeeze(1).double()
        row = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(targets)[keep]
        if counted:
            sums.append(torch.zeros(len(rows), dtype=torch.float64, device=device)
                        .index_add_(0, row, token_lp))
            where += batches[b]
    result = [0.0] * len(seqs)
    if sums:
        for k, value in zip(where, torch.cat(sums).tolist()):
            result[k] = value
    return result


def _device_of(model, device):
    if device is not None:
        return torch.device(device)
    return next(_inner(model).parameters()).device


def _score(model, tokenizer, examples, batch_size, device, autocast, passes=0, filler_from=None):
    encoded = encode_hellaswag(tokenizer, examples, _context_window(model))
    seqs = [s for four in encoded for s in four]
    filler = None
    if passes * batch_size > len(seqs):  # this rank has fewer passes than another
        filler = encode_hellaswag(tokenizer, filler_from[:1], _context_window(model))[0][0]
    sums = _sequence_logprobs(model, seqs, batch_size, device, autocast, passes, filler)
    counts = [s for _, s in seqs]
    return [{"sum_logprob": sums[4 * i:4 * i + 4],
             "mean_logprob": [s / c for s, c in zip(sums[4 * i:4 * i + 4], counts[4 * i:4 * i + 4])],
             # lm-eval divides by len(choice): characters of the ending, without its space
             "char_logprob": [s / max(1, len(x)) for s, x in zip(sums[4 * i:4 * i + 4],
                                                                e["endings"])],
             "label": e["label"]} for i, e in enumerate(examples)]


def score_hellaswag(model, tokenizer, examples: list[dict], batch_size: int = 32, device=None,
                    autocast: Optional[Callable] = None) -> list[dict]:
    """Per example {"sum_logprob": [4], "mean_logprob": [4] (per ending token),
    "char_logprob": [4] (per character of the ending), "label": int}, in order; this
    process scores all of `examples` (no sharding). `device`: where the inputs go (default: the
    model's); `autocast`: a context-manager factory the forward passes run in (e.g.
    accelerator.autocast)."""
    with eval_mode(model):
        return _score(model, tokenizer, examples, batch_size, _device_of(model, device), autocast)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda k: values[k])  # the first of equal maxima


def hellaswag_counts(model, tokenizer, examples: list[dict], batch_size: int = 32, device=None,
                     autocast: Optional[Callable] = None,
                     topology: Topology = Topology()) -> tuple[int, int, int, int]:
    """(correct by summed log-likelihood, by log-likelihood per character of the ending, by
    mean log-likelihood per ending token, examples scored),
    over all of `examples`. On more than one process (`topology`) every rank must call it
    with the same examples: each scores examples[rank::world], all run the same number of
    forward passes, and the counts are summed over ranks (on `device`, so it must suit the
    process group: CUDA for NCCL)."""
    rank, world = topology.dp_rank, topology.dp_world_size
    device = _device_of(model, device)
    mine = examples[rank::world]
    # the rank with the most examples runs this many passes; the others match it
    passes = math.ceil(4 * math.ceil(len(examples) / world) / batch_size)
    with eval_mode(model):
        scores = _score(model, tokenizer, mine, batch_size, device, autocast, passes, examples)
    counts = [sum(_argmax(s[key]) == s["label"] for s in scores)
              for key in ("sum_logprob", "char_logprob", "mean_logprob")]
    counts = torch.tensor(counts + [len(scores)], dtype=torch.long, device=device)
    if world > 1:
        torch.distributed.all_reduce(counts)
    return tuple(int(x) for x in counts.tolist())


def hellaswag_scores(model, tokenizer, examples: list[dict], batch_size: int = 32, device=None,
                     autocast: Optional[Callable] = None,
                     topology: Topology = Topology()) -> dict:
    """{"acc", "acc_norm", "acc_norm_char", "n"} over `examples` (see the module docstring
    and hellaswag_counts; every rank gets the same
    result). The model's training mode is restored after."""
    if not examples:
        raise ValueError("hellaswag_scores needs at least one example")
    correct, by_char, by_token, n = hellaswag_counts(model, tokenizer, examples, batch_size,
                                                     device, autocast, topology)
    return {"acc": correct / n, "acc_norm": by_token / n, "acc_norm_char": by_char / n, "n": n}


# ----------------------------------------------------------------------------- in training

@dataclass
class BenchmarkEvalConfig:
    """Downstream benchmarks scored at each evaluation of a training run."""

    eval_tasks: list[str] = field(default_factory=list, metadata={
        "help": "Benchmarks scored at every evaluation: hellaswag (built in, logged as "
                "eval_hellaswag_acc, _acc_norm (per token, llm.c's) and _acc_norm_char (per "
                "character: lm-eval's acc_norm)), or any lm-evaluation-harness task with lm-eval installed (its "
                "registry, the shipped demo_choice, demo_perplexity and demo_generate, or "
                "--eval_tasks_include_path), logged as eval_<task>_<metric>."})
    eval_tasks_limit: Optional[int] = _help(
        "Examples of each benchmark scored at each evaluation (0: all).", default=500)
    eval_tasks_data_files: Optional[str] = _help(
        f"Local HellaSwag JSON lines for --eval_tasks (default: {HELLASWAG_HUB} from the Hub).",
        default=None)
    eval_tasks_include_path: Optional[str] = _help(
        "A folder of lm-eval task YAMLs for --eval_tasks (besides its registry and the shipped "
        "tasks).", default=None)

    def __post_init__(self):
        self.eval_tasks = list(dict.fromkeys(t.strip() for item in self.eval_tasks or []
                                             for t in item.split(",") if t.strip()))
        if self.eval_tasks_limit is not None and self.eval_tasks_limit < 0:
            raise UsageError("--eval_tasks_limit must be >= 0 (0: every example)")


def make_benchmark_eval(cfg: BenchmarkEvalConfig, tokenizer, batch_size: int):
    """The function the loop calls at each evaluation, `fn(model, backend) -> dict`, or
    None without --eval_tasks; the data is read and the tasks checked now, before any
    training (lm-eval's tasks by clm.harness)."""
    if not cfg.eval_tasks:
        return None
    limit = cfg.eval_tasks_limit or None
    others = [task for task in cfg.eval_tasks if task not in TASKS]
    harness = None
    if others:  # names first: a wrong one is an error before any data is read
        from .harness import make_harness_eval

        harness = make_harness_eval(others, cfg.eval_tasks_include_path, tokenizer, batch_size,
                                    limit)
    data = {task: load_hellaswag(cfg.eval_tasks_data_files, limit)
            for task in cfg.eval_tasks if task in TASKS}

    def run(model, backend) -> dict:
        results = {}
        for task, examples in data.items():
            scores = hellaswag_scores(model, tokenizer, examples, batch_size, backend.device,
                                      backend.accelerator.autocast, backend.topology)
            results.update({f"eval_{task}_{k}": scores[k]
                            for k in ("acc", "acc_norm", "acc_norm_char")})
        if harness is not None:
            results.update(harness(model, backend))
        return results
    return run


# ----------------------------------------------------------------------------- CLI

def _start_distributed(topology: Topology) -> bool:
    """Join the process group torchrun describes (more than one process); True if this call
    made it."""
    d = torch.distributed
    if not topology.distributed or (d.is_available() and d.is_initialized()):
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(topology.local_rank)
    d.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def main(cfg: EvalConfig) -> dict:
    from clm.sampling import load_model

    data = {task: load_hellaswag(cfg.data_files, cfg.limit) for task in cfg.tasks}  # before the model
    topology = Topology.from_launcher()
    started = _start_distributed(topology)
    try:
        topology.check_group()
        model, tokenizer = load_model(cfg.model, cfg.device, cfg.dtype)
        results = {task: hellaswag_scores(model, tokenizer, examples, cfg.batch_size,
                                          topology=topology)
                   for task, examples in data.items()}
        if topology.is_main:
            print(json.dumps(results), flush=True)
        return results
    finally:
        if started:
            close_distributed()


if __name__ == "__main__":
    run_cli(main, [EvalConfig], description=__doc__.splitlines()[0])
