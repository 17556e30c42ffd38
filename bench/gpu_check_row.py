"""One row of bench/gpu_check.sh's table, from an item's exit code and the files it wrote.

    python bench/gpu_check_row.py --item pretrain --rc 0 --seconds 151 --cap 240 \
        --work /tmp/gpu_check_work.x --results /tmp/gpu_check/results.jsonl --label "..."

Prints the markdown row `| item | shapes | result | s | figures |` and appends the item's
figures as one JSON line to --results. The item's stdout and stderr are WORK/ITEM.out and
WORK/ITEM.err; its output folder, where it has one, WORK/ITEM. A failed item's row gives its exit
code and the last error line of its output; a timed-out one (exit 124, or 137 once killed) says
so. Standard library only: it must run where an item broke the Python environment.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

TIMED_OUT = (124, 137)  # timeout's TERM, then its KILL (-k)
ERROR = re.compile(r"^error: |\b\w*(Error|Exception)\b|Traceback|Killed|out of memory")


class NoResult(Exception):
    """An item that exited 0 without the figures it promised."""


def text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def last_json(path: Path) -> dict:
    """The last line of `path` that is a JSON object (the --dry_run plan, generate_speed)."""
    for line in reversed(text(path).splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                continue
    raise NoResult(f"no JSON line in {path.name}")


def whole_json(path: Path) -> dict:
    """A JSON object that ends the file (train_throughput prints an indented one)."""
    s = text(path)
    at = s.rfind("\n{")
    try:
        return json.loads(s[at + 1 if at >= 0 else 0:])
    except ValueError:
        raise NoResult(f"no JSON result in {path.name}") from None


def last_error_line(work: Path, item: str) -> str:
    lines = [x.strip() for f in (f"{item}.out", f"{item}.err")
             for x in text(work / f).splitlines() if x.strip()]
    errors = [x for x in lines if ERROR.search(x) and "Warning" not in x]
    line = (errors or lines or ["(no output)"])[-1]
    return line[:200]


def metrics(folder: Path) -> tuple[list[dict], list[dict]]:
    """(training records, evaluation records) of an output folder's metrics.jsonl: read here,
    not with clm.metrics.read_metrics, so that a broken environment still gets its row."""
    rows = [json.loads(x) for x in text(folder / "metrics.jsonl").splitlines() if x.strip()]
    if not rows:
        raise NoResult(f"no metrics.jsonl in {folder}")
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def steady_tokens_per_sec(train: list[dict]) -> float | None:
    """The median tokens/s of the training records after the first (start-up, compilation)."""
    values = [r["tokens_per_sec"] for r in train[1:] if r.get("tokens_per_sec")]
    return round(statistics.median(values), 1) if values else None


def num(x, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and abs(x) >= 1000:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


# --- the figures of each item: (figures for results.jsonl, the row's text)

def setup(work: Path) -> tuple[dict, str]:
    env = last_json(work / "setup.out")
    shards = list((work / "corpus").rglob("*.parquet"))
    tokenizer = json.loads(text(work / "tokenizer" / "tokenizer.json") or "{}")
    vocab = len(tokenizer.get("model", {}).get("vocab", {}))
    records = len(text(work / "sft_data" / "train.jsonl").splitlines())
    if not shards or not vocab or not records:
        raise NoResult("corpus, tokenizer or finetuning records missing")
    mb = sum(f.stat().st_size for f in shards) / 1e6
    figures = {**env, "corpus_parquet_mb": round(mb, 2), "tokenizer_vocab": vocab,
               "sft_records": records}
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "accelerate",
                                                    "datasets", "deepspeed") if env.get(k))
    return figures, (f"{env.get('device')}; {versions}; corpus {mb:.1f} MB parquet, tokenizer "
                     f"{vocab} tokens, {records} finetuning records")


def plan(work: Path) -> tuple[dict, str]:
    p = last_json(work / "plan.out")
    m = p["memory_gib"]
    figures = {"memory_gib": m, "fits": p["fits"], "gpu": p["gpu"],
               "gpu_memory_gib": p["gpu_memory_gib"], "params": p["params"],
               "flops_per_token": p["flops_per_token"]}
    return figures, (f"per-GPU memory {m['total']:.2f} GiB (weights {m['weights']:.2f}, "
                     f"gradients {m['gradients']:.2f}, optimizer {m['optimizer']:.2f}, "
                     f"activations {m['activations']:.2f}); "
                     f"{'fits' if p['fits'] else 'does NOT fit'} in {p['gpu_memory_gib']:.0f} GiB "
                     f"({p['gpu']}); {p['params'] / 1e6:.1f}M parameters")


def pretrain(work: Path) -> tuple[dict, str]:
    r = whole_json(work / "pretrain.out")
    o = r.get("ours") or {}
    if not o.get("tokens_per_sec"):
        raise NoResult("no tokens/s in train_throughput's output")
    try:
        planned = last_json(work / "plan.out")["memory_gib"]["total"]
    except (NoResult, KeyError):
        planned = None
    figures = {k: o.get(k) for k in ("tokens_per_sec", "mfu", "peak_memory_gb", "sdpa_backends",
                                     "data_wait", "step_s", "final_loss", "params")}
    figures.update(device=r.get("device"), planned_memory_gib=planned)
    mfu = "n/a" if o.get("mfu") is None else f"{100 * o['mfu']:.1f}%"
    beside = "n/a (the --dry_run item failed)" if planned is None else \
        f"{planned:.2f} GiB, measured/planned {o['peak_memory_gb'] / planned:.2f}"
    return figures, (f"tokens/s {num(o['tokens_per_sec'])}; MFU {mfu}; peak memory "
                     f"{o['peak_memory_gb']:.3f} GiB (--dry_run: {beside}); SDPA kernels "
                     f"{o.get('sdpa_backends')}; data wait {num(o.get('data_wait'), 2)}; "
                     f"loss {num(o.get('final_loss'), 4)}")


def reference(work: Path) -> tuple[dict, str]:
    ref = whole_json(work / "reference.out").get("reference") or {}
    if not ref.get("tokens_per_sec"):
        raise NoResult("no tokens/s in train_throughput's output")
    try:
        ours = whole_json(work / "pretrain.out")["ours"]["tokens_per_sec"]
    except (NoResult, KeyError, TypeError):
        ours = None
    ratio = round(ours / ref["tokens_per_sec"], 3) if ours else None
    figures = {k: ref.get(k) for k in ("tokens_per_sec", "mfu", "peak_memory_gb", "step_s",
                                       "final_loss")}
    figures["ours_over_reference"] = ratio
    mfu = "n/a" if ref.get("mfu") is None else f"{100 * ref['mfu']:.1f}%"
    return figures, (f"tokens/s {num(ref['tokens_per_sec'])}; MFU {mfu}; peak memory "
                     f"{ref['peak_memory_gb']:.3f} GiB; ours/reference "
                     f"{num(ratio) if ratio else 'n/a (the pretrain item failed)'}")


def zero2(work: Path) -> tuple[dict, str]:
    train, evals = metrics(work / "zero2")
    ckpts = sorted(p.name for p in (work / "zero2" / "checkpoints").glob("step-*"))
    if not train or not evals or not ckpts:
        raise NoResult("no training loss, eval loss or checkpoint in the output folder")
    figures = {"steps": train[-1]["step"], "final_loss": train[-1]["loss"],
               "final_eval_loss": evals[-1]["eval_loss"],
               "tokens_per_sec": steady_tokens_per_sec(train), "checkpoints": ckpts}
    return figures, (f"{figures['steps']} steps; final eval loss {evals[-1]['eval_loss']:.4f}; "
                     f"tokens/s {num(figures['tokens_per_sec'])}; checkpoints {', '.join(ckpts)}")


def sft(work: Path) -> tuple[dict, str]:
    train, evals = metrics(work / "sft")
    if not train or not (work / "sft" / "model.safetensors").is_file():
        raise NoResult("no training loss or final model in the output folder")
    base = text(work / "sft.base").strip() or "?"
    figures = {"base": base, "steps": train[-1]["step"], "first_loss": train[0]["loss"],
               "final_loss": train[-1]["loss"],
               "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
               "tokens_per_sec": steady_tokens_per_sec(train)}
    return figures, (f"from {base}: {figures['steps']} steps; loss {train[0]['loss']:.4f} -> "
                     f"{train[-1]['loss']:.4f}; eval loss {num(figures['final_eval_loss'], 4)}; "
                     f"tokens/s {num(figures['tokens_per_sec'])}")


def generate(work: Path) -> tuple[dict, str]:
    g = last_json(work / "generate.out")
    if not g.get("completions") or not g.get("decoded_positions"):
        raise NoResult("no text generated")
    base = text(work / "generate.base").strip() or "?"
    lines = [x for x in text(work / "generate.out").splitlines()
             if x.strip() and not x.startswith("{") and not set(x) <= {"-"}]
    sample = (lines[0] if lines else "").replace("|", "/")[:60]
    figures = {"base": base, **{k: g[k] for k in ("completions", "decoded_positions", "seconds",
                                                  "tokens_per_sec", "device")}, "sample": sample}
    return figures, (f"from {base}: tokens/s {num(g['tokens_per_sec'])} ({g['completions']} "
                     f"completions, {g['decoded_positions']} positions in {g['seconds']:.2f} s); "
                     f"e.g. \"{sample}\"")


ITEMS = {f.__name__: f for f in (setup, plan, pretrain, reference, zero2, sft, generate)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--item", required=True, choices=list(ITEMS))
    p.add_argument("--rc", required=True, help="the item's exit code, or 'skip'")
    p.add_argument("--seconds", type=int, default=0)
    p.add_argument("--cap", type=int, default=0, help="the item's time limit, in seconds")
    p.add_argument("--work", required=True, type=Path)
    p.add_argument("--results", required=True, type=Path)
    p.add_argument("--label", default=None)
    p.add_argument("--shapes", default="")
    p.add_argument("--why", default="", help="with --rc skip: why the item did not run")
    a = p.parse_args()
    figures, shown = {}, ""
    if a.rc == "skip":
        status, result = "skipped", f"skipped: {a.why}"
    elif int(a.rc) in TIMED_OUT:
        status = "timed out"
        result = (f"timed out after {a.cap} s (exit {a.rc}): "
                  f"{last_error_line(a.work, a.item)}")
    elif int(a.rc) != 0:
        status, result = "failed", f"failed (exit {a.rc}): {last_error_line(a.work, a.item)}"
    else:
        try:
            figures, shown = ITEMS[a.item](a.work)
            status, result = "ok", "ok"
        except (NoResult, KeyError, TypeError, ValueError, ZeroDivisionError) as e:
            status, result = "failed", f"failed: exit 0 but {type(e).__name__}: {e}"[:240]
    cell = lambda s: str(s).replace("|", "/").replace("\n", " ")  # noqa: E731
    print(f"| {cell(a.label or a.item)} | {cell(a.shapes)} | {cell(result)} | {a.seconds} | "
          f"{cell(shown)} |", flush=True)
    with a.results.open("a") as f:
        f.write(json.dumps({"item": a.item, "status": status, "exit": a.rc,
                            "seconds": a.seconds, "cap_s": a.cap, "result": result,
                            **figures}) + "\n")


if __name__ == "__main__":
    main()
