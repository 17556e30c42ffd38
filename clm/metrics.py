"""What a run reports: metrics.jsonl, Accelerate trackers, loss_curve.png, the progress bar, and the
GPU peaks its MFU is measured against.

    python -c "from clm.metrics import plot_loss_curve; plot_loss_curve('outputs/demo')"

Only the main process writes; every other rank's logger is silent. `metrics.jsonl` holds one JSON
object a line: training records {step, tokens, loss, lr, grad_norm, tokens_per_sec, elapsed_s,
mfu} and evaluation records {step, tokens, eval_loss, eval_ppl}.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tqdm.auto import tqdm


# Dense (no sparsity) bf16 tensor-core peak FLOP/s, for MFU, by the exact name
# `torch.cuda.get_device_name` reports. Exact, not by substring: "L4" is in "NVIDIA L40S" (3x
# its peak) and the H100's PCIe and NVL boards are slower than the SXM one, so a near match
# would report a wrong MFU; an unknown name reports none. Figures are the datasheets' sparse
# ones halved where only those are given.
PEAK_FLOPS = {
    "NVIDIA B200": 2250e12,
    "NVIDIA H200": 989e12,              # SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA H100 80GB HBM3": 989e12,    # SXM5
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L40": 181e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "NVIDIA A10G": 125e12,              # AWS's A10 variant; no datasheet of its own
    "NVIDIA GeForce RTX 4090": 165e12,
}


def peak_flops_of(name: str) -> float | None:
    """The dense bf16 peak of the GPU `torch.cuda.get_device_name` calls `name`, None if unknown."""
    return PEAK_FLOPS.get(name.strip())


def peak_flops(device) -> float | None:
    """The `torch.device`'s dense bf16 peak, or None where unknown (CPUs, GPUs not in
    PEAK_FLOPS)."""
    if device.type != "cuda":
        return None
    import torch

    return peak_flops_of(torch.cuda.get_device_name(device))


def read_metrics(output_dir: str | Path, kind: str | None = None) -> list[dict]:
    """The records of `output_dir`/metrics.jsonl ([] before the first is written): all of them,
    or `kind="train"` (those with a loss, skipped steps included) or `kind="eval"`."""
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if kind is None:
        return records
    key = {"train": "loss", "eval": "eval_loss"}.get(kind)
    if key is None:
        raise ValueError(f"kind must be 'train', 'eval' or None (got {kind!r})")
    return [r for r in records if key in r]


def plot_loss_curve(output_dir: str | Path) -> Path:
    """Draw train and eval loss against tokens from metrics.jsonl into loss_curve.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    records = read_metrics(output_dir)
    train = [(r["tokens"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["tokens"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1, alpha=0.8)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=2)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(output_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = output_dir / "loss_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class MetricsLogger:
    """Writes records to metrics.jsonl and the trackers, and drives the progress bar. A
    training record gets its model FLOPs utilisation here ("mfu", per device, None where the
    peak is unknown: CPUs) from the model's `flops_per_token`, the devices' `peak_flops` and
    their number."""

    def __init__(self, output_dir: str | Path, accelerator, max_steps: int, start_step: int = 0,
                 flops_per_token: float | None = None, peak_flops: float | None = None,
                 devices: int = 1):
        self.accelerator = accelerator
        self.flops_per_token, self.peak_flops, self.devices = flops_per_token, peak_flops, devices
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = tqdm(total=max_steps, initial=start_step, disable=not self.main,
                        dynamic_ncols=True, desc="train")

    def _write(self, record: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def log_train(self, record: dict) -> None:
        record["mfu"] = round(self.flops_per_token * record["tokens_per_sec"] /
                              (self.peak_flops * self.devices), 4) \
            if self.flops_per_token and self.peak_flops else None
        self._write(record)
        self.accelerator.log({f"train/{k}": v for k, v in record.items()
                              if k != "step" and isinstance(v, (int, float))}, step=record["step"])
        loss = record.get("loss")
        self.bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "skipped",
                             tok_s=f"{record.get('tokens_per_sec', 0):,.0f}")

    def log_eval(self, step: int, tokens: int, results: dict) -> dict:
        """`results`: {"eval_loss": .., "eval_<metric>": ..}; the perplexity is added here."""
        record = {"step": step, "tokens": tokens, **results}
        loss = results.get("eval_loss")
        if loss is not None:
            record["eval_ppl"] = math.exp(min(loss, 700))
        self._write(record)
        self.accelerator.log({f"eval/{k[5:]}": v for k, v in record.items()
                              if k.startswith("eval_")}, step=step)
        if self.main:
            shown = [f"eval loss {loss:.4f}, ppl {record['eval_ppl']:.2f}"] if loss is not None \
                else []
            shown += [f"{k[5:]} {v:.4f}" for k, v in results.items() if k != "eval_loss"]
            self.bar.write(f"step {step}: " + ", ".join(shown))
            if loss is not None:
                plot_loss_curve(self.path.parent)
        return record

    def log_event(self, step: int, tokens: int, event: dict) -> dict:
        """An event of the run (`event["event"]` names it: "loss_spike"), in metrics.jsonl
        (records without "loss" or "eval_loss", so curves and read_metrics' kinds skip them),
        the trackers and the progress line."""
        record = {"step": step, "tokens": tokens, **event}
        self._write(record)
        self.accelerator.log({f"events/{event['event']}": event.get("step_loss", 1)}, step=step)
        if self.main and event["event"] == "loss_spike":
            self.bar.write(f"step {step}: loss spike {event['step_loss']:.4f}, "
                           f"{event['ratio']:.2f}x the median {event['median_loss']:.4f} of "
                           f"the last {event['window']} steps")
        return record

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def wandb_run_id(accelerator) -> str | None:
    """The wandb run's id (kept in checkpoints so a resumed run continues it), if wandb is on."""
    try:
        return accelerator.get_tracker("wandb", unwrap=True).id
    except Exception:  # wandb is not one of the trackers
        return None
