"""The output folder of a run: guard, run_config.yaml, final model, samples and model card.

    ls outputs/demo   # config.json model.safetensors tokenizer.json README.md run_config.yaml ...
"""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
from pathlib import Path

import torch
import yaml

from .checkpoint import save_model_folder
from .errors import UsageError
from .hub import command_line, model_card
from .metrics import plot_loss_curve, read_metrics
from .record import ModelInfo, RunRecord

RUN_FILES = ("metrics.jsonl", "loss_curve.png", "samples.txt", "run_config.yaml", "README.md")


def check_output_dir(output_dir: str, overwrite: bool) -> None:
    """Refuse to write into another run's non-empty folder unless told to."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output_dir {output_dir} is a file (choose a folder)")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {output_dir} is not empty (pass --overwrite_output_dir "
                         "to replace it, or choose another folder)")


LAUNCH_FILE = ".launch.json"  # hidden: not pushed to the Hub


def mark_launch(output_dir, topology) -> None:
    """Record which launch (torchrun agent) writes this folder now, so that the agent's
    restarts of that launch, and only they, continue in it without a flag (session.check_output);
    a run with no agent leaves no mark."""
    path = Path(output_dir) / LAUNCH_FILE
    if topology.job is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"job": topology.job}))
    tmp.replace(path)


def launched_by(output_dir) -> str | None:
    """The launch that last started writing `output_dir` (mark_launch), if any."""
    try:
        return str(json.loads((Path(output_dir) / LAUNCH_FILE).read_text())["job"])
    except (OSError, ValueError, KeyError):
        return None


def clear_run_files(output_dir: str) -> None:
    path = Path(output_dir)
    for name in RUN_FILES:
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / "checkpoints", ignore_errors=True)


def continue_run(output_dir, home, step: int) -> None:
    """On resume: the run's metrics go on from the checkpoint's step. A checkpoint of another
    output folder (`home`) brings that run's metrics up to its step into this one."""
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    if home is not None and Path(home).resolve() != path.resolve():
        clear_run_files(output_dir)
        source = Path(home) / "metrics.jsonl"
        if source.is_file():
            shutil.copyfile(source, path / "metrics.jsonl")
    truncate_metrics(output_dir, step)


def truncate_metrics(output_dir, step: int) -> None:
    """On resume: drop what a killed run logged after its checkpoint, then redraw the curve."""
    path = Path(output_dir) / "metrics.jsonl"
    kept = [r for r in read_metrics(output_dir) if r["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    if kept:
        plot_loss_curve(output_dir)


def library_versions() -> dict:
    import accelerate
    import datasets
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": str(torch.__version__),
            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
            "datasets": datasets.__version__, "tokenizers": tokenizers.__version__}


def resolved_config(configs: dict, model, world_size: int, train_cfg, block_size: int,
                    **fields) -> RunRecord:
    """The run's record as it starts: every option, what the run derives from them, and
    `fields` (finetuning's data counts)."""
    c = model.config
    seqs = train_cfg.global_batch(world_size)
    info = ModelInfo(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd,
                     n_positions=c.n_positions, vocab_size=c.vocab_size,
                     params=sum(p.numel() for p in model.parameters()))
    return RunRecord(options={name: dataclasses.asdict(cfg) for name, cfg in configs.items()},
                     world_size=world_size, global_batch_sequences=seqs,
                     tokens_per_step=seqs * block_size, model_info=info, command=command_line(),
                     versions=library_versions(), **fields)


def write_record(path: Path, record: RunRecord) -> None:
    write_yaml(path, record.to_dict())


def write_yaml(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)


@torch.no_grad()
def sample_texts(model, tokenizer, prompt: str, n: int, max_new_tokens: int, seed: int) -> list[str]:
    if n == 0:
        return []
    was_training = model.training
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"] if prompt else \
        torch.tensor([[tokenizer.bos_token_id or tokenizer.eos_token_id]])
    ids = ids.to(next(model.parameters()).device)
    torch.manual_seed(seed)
    out = model.generate(ids.repeat(n, 1), attention_mask=torch.ones_like(ids).repeat(n, 1),
                         do_sample=True, top_k=50, temperature=0.8,
                         max_new_tokens=max_new_tokens, use_cache=True,
                         synced_gpus=False)  # only this process samples, also under ZeRO-3
    model.train(was_training)
    return [tokenizer.decode(o, skip_special_tokens=True) for o in out]


def finish_run(output_dir: str, model, tokenizer, run: RunRecord, train_cfg) -> list[str]:
    """Write the final model folder, samples.txt and the model card (main process only)."""
    out = Path(output_dir)
    save_model_folder(model, tokenizer, out)
    samples = sample_texts(model, tokenizer, train_cfg.sample_prompt, train_cfg.num_samples,
                           train_cfg.sample_max_new_tokens, train_cfg.seed)
    (out / "samples.txt").write_text("".join(f"--- sample {i}\n{s}\n" for i, s in
                                             enumerate(samples)))
    write_record(out / "run_config.yaml", run)
    (out / "README.md").write_text(model_card(run))
    return samples
