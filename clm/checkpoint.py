"""Checkpoints: full training state, atomic, rotated, verified; and plain HF model folders.

    python train_clm.py --config configs/demo_cpu.yaml --save_steps 50                # writes checkpoints
    python train_clm.py --config configs/demo_cpu.yaml --save_steps 50 --resume_from_checkpoint latest

`checkpoints/step-<N>/` holds a plain Hugging Face model folder at its top (so `pipeline()` and
`generate.py` load it directly) and, under `state/`, everything else a run needs to continue
exactly: model and optimizer (and grad scaler) as the run's backend saves them
(`Accelerator.save_state`, which DeepSpeed plugs into; FSDP2: a torch.distributed.checkpoint
folder), each rank's RNG states, each rank's data-pipeline state, and
`trainer_state.json` (the loop's counters, the tracker's run id, and what must match on resume).
It is written under `.step-<N>.tmp`, flushed, listed with its file sizes (and the name of the
backend that wrote `state/`) in `manifest.json` and only then renamed into place; `latest` is
the newest checkpoint whose manifest checks out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from . import faults
from .errors import UsageError
from .parallel import Backend

MANIFEST = "manifest.json"


class CheckpointError(UsageError):
    """A checkpoint could not be written or read: reported as one line, nothing else lost."""


# ----------------------------------------------------------------------------- HF folders

def save_model_folder(model, tokenizer, dest: str | Path) -> Path:
    """Write `model` (unwrapped) and `tokenizer` into `dest` as safetensors + tokenizer files.

    Files go into a hidden temporary folder first and are moved into place with `os.replace`,
    so a reader never sees a half-written file.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with _inference_config(model):
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    _portable_tokenizer_config(tmp / "tokenizer_config.json", model.config)
    for f in sorted(tmp.iterdir()):
        _fsync(f)
        os.replace(f, dest / f.name)
    tmp.rmdir()
    return dest


# transformers 5 saves a tokenizer by its backend's class; transformers 4 (and what pins it, such
# as optimum-onnx) knows these by their older names, which 5 still reads as the same classes
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast",
                              "GPT2Tokenizer": "GPT2TokenizerFast"}


@contextmanager
def _inference_config(model):
    """The model's config as a folder's users need it, while it is saved: the KV cache on for
    generation (training turns it off in memory, and every training forward passes
    use_cache=False itself), and GPT-2's `n_ctx` (n_positions by its old name, which
    llama.cpp's GGUF converter reads)."""
    config, gen = model.config, getattr(model, "generation_config", None)
    before = config.use_cache, getattr(gen, "use_cache", None)
    config.use_cache = True
    if gen is not None:
        gen.use_cache = True
    if getattr(config, "model_type", None) == "gpt2":
        config.n_ctx = config.n_positions
    try:
        yield
    finally:
        config.use_cache = before[0]
        if gen is not None:
            gen.use_cache = before[1]


def _portable_tokenizer_config(path: Path, config) -> None:
    """tokenizer_config.json as transformers 4 and 5 both load it, with the model's limits: its
    class by a name both know, `model_max_length` no longer than the model's positions (so
    `truncation=True` fits the model), and a pad token (EOS, the one generation already pads
    with) where it has none."""
    if not path.is_file():
        return
    data = json.loads(path.read_text())
    for flag in ("is_local", "local_files_only"):  # how it was loaded, not what it is
        data.pop(flag, None)
    name = data.get("tokenizer_class")
    data["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES.get(name, name)
    positions = getattr(config, "n_positions", None) or getattr(
        config, "max_position_embeddings", None)
    if positions:
        data["model_max_length"] = min(int(data.get("model_max_length") or positions), positions)
    if data.get("pad_token") is None and data.get("eos_token") is not None:
        data["pad_token"] = data["eos_token"]
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- finding

def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    name = path.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def step_folders(root: str | Path) -> list[Path]:
    """The `step-<N>` folders directly in `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Renamed-into-place checkpoints, oldest first (complete or not: see `verify`)."""
    return step_folders(checkpoint_root(output_dir))


def verify(path: Path) -> str | None:
    """None if the checkpoint is complete and undamaged, else what is wrong with it."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "unreadable manifest"
    for rel, size in files.items():
        f = path / rel
        if not f.is_file():
            return f"missing {rel}"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, expected {size}"
    return None


def read_manifest(path: Path) -> dict:
    """A complete checkpoint's manifest: its step, the backend that wrote `state/`, its files."""
    return json.loads((Path(path) / MANIFEST).read_text())


def resolve_resume(output_dir: str | Path, spec: str, log=print) -> Path:
    """The checkpoint folder `--resume_from_checkpoint spec` names; `latest` skips damaged ones."""
    if spec != "latest":
        path = Path(spec)
        if not path.is_dir():
            raise CheckpointError(f"--resume_from_checkpoint {spec} is not a folder (pass "
                                  "'latest' or a checkpoints/step-N folder)")
        problem = verify(path)
        if problem:
            raise CheckpointError(f"checkpoint {path} is damaged: {problem} (pass an earlier "
                                  "checkpoint or 'latest')")
        return path
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"warning: checkpoint {path} is damaged ({problem}); trying the previous one")
    raise CheckpointError(f"--resume_from_checkpoint latest: no complete checkpoint in "
                          f"{checkpoint_root(output_dir)} (run without it to start afresh)")


def newest_complete(output_dir: str | Path, log=print) -> Path | None:
    """The newest complete checkpoint in `output_dir` (`auto`), or None if it has none."""
    try:
        return resolve_resume(output_dir, "latest", log)
    except CheckpointError:
        return None


def home_of(path: Path) -> Path | None:
    """The output folder a checkpoints/step-N folder belongs to (None if not laid out so)."""
    path = Path(path).resolve()
    return path.parent.parent if path.parent.name == "checkpoints" else None


def clean_leftovers(output_dir: str | Path, log=print) -> list[Path]:
    """Remove `.step-N.tmp` folders a run killed mid-save left behind (never a checkpoint)."""
    root = checkpoint_root(output_dir)
    gone = sorted(root.glob(".step-*.tmp")) if root.is_dir() else []
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path.name}, a checkpoint whose save was interrupted")
    return gone


def set_aside_newer(output_dir: str | Path, step: int, log=print) -> Path | None:
    """Resuming from an older checkpoint starts a new future: the abandoned run's checkpoints
    after `step` move to checkpoints/abandoned-after-step-<step>[-k]/, out of `latest`'s and
    rotation's way (and no save of the new run lands on or is skipped for their steps)."""
    newer = [p for p in list_checkpoints(output_dir) if _step_of(p) > step]
    if not newer:
        return None
    root = checkpoint_root(output_dir)
    aside, k = root / f"abandoned-after-step-{step}", 1
    while aside.exists():
        k += 1
        aside = root / f"abandoned-after-step-{step}-{k}"
    aside.mkdir()
    for path in newer:
        os.replace(path, aside / path.name)
    _fsync(root)
    log(f"resuming from step {step}: moved the abandoned run's newer checkpoints "
        f"({', '.join(p.name for p in newer)}) to {aside} (delete it when not needed)")
    return aside


# ----------------------------------------------------------------------------- save / load

def fingerprint(model, tokenizer, block_size: int, global_batch: int, world_size: int,
                num_workers: int, configs: dict | None = None) -> dict:
    """What a resume must match: the model's shape, the tokenizer's vocabulary, the block size,
    the global batch, and every option of the run's `configs` (section name -> config
    dataclass) except those in MAY_CHANGE (`config_identity`); the processes and DataLoader
    workers are recorded too, but may change (LAYOUT)."""
    c = model.config
    vocab = json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()
    return {"model_type": c.model_type, "n_layer": c.n_layer, "n_head": c.n_head,
            "n_embd": c.n_embd, "n_positions": c.n_positions, "vocab_size": c.vocab_size,
            "tokenizer": hashlib.sha256(vocab).hexdigest()[:16], "block_size": block_size,
            "global_batch": global_batch, "world_size": world_size, "num_workers": num_workers,
            **config_identity(configs or {})}


# The options that may differ between a run and its resume; every other option of every config
# dataclass is in the fingerprint, so an option added to a dataclass is covered by default.
MAY_CHANGE = frozenset({
    # where and how the run is stored, shown, tracked and published
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "logging_steps",
    "eval_steps", "save_steps", "save_total_limit", "report_to", "run_name", "num_samples",
    "sample_max_new_tokens", "sample_prompt", "push_to_hub", "hub_model_id",
    "hub_private_repo", "hub_strategy", "license", "dry_run", "dry_run_gpu",
    "dry_run_gpu_memory_gb", "dry_run_mfu", "dry_run_num_gpus", "merge_adapters",
    # how the same steps are computed: the batch split (the global batch is checked itself),
    # evaluation batches, recomputation, compilation, attention kernel, timeouts, bad-step limit
    "per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
    "gradient_checkpointing", "torch_compile", "attn_implementation", "ddp_timeout",
    "max_bad_steps", "loss_spike_factor", "step_timeout", "dataloader_num_workers",
    # the schedule, so that a run can be extended (--max_steps) or its rates changed; the
    # optimizer itself (--optim, its betas, epsilon, weight decay, clipping) must match
    "max_steps", "learning_rate", "min_lr", "warmup_steps", "lr_scheduler_type",
    "lr_scheduler_kwargs",
    # a tokenizer is compared by its vocabulary ("tokenizer"), not by where it was read from
    "tokenizer_name",
})
# Whole sections that never change a run's trajectory (downstream evaluations).
MAY_CHANGE_SECTIONS = frozenset({"evaluation"})


def config_identity(configs: dict) -> dict:
    """{"<section>.<option>": value} of every field of each config dataclass in `configs`
    that is not in MAY_CHANGE. Local paths are compared resolved, so a resume from another
    working directory is not refused."""
    def norm(value):
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        if isinstance(value, str) and os.path.exists(value):
            return str(Path(value).resolve())
        return value
    return {f"{section}.{f.name}": norm(getattr(cfg, f.name))
            for section, cfg in configs.items() if section not in MAY_CHANGE_SECTIONS
            for f in dataclasses.fields(cfg) if f.name not in MAY_CHANGE}


# What a resume may change: the number of processes and DataLoader workers (the data is dealt
# again, the model and optimizer re-sharded, accumulation recomputed: see session.fit_to_world).
LAYOUT = ("world_size", "num_workers")
FIX = {"global_batch": "keep per_device_train_batch_size x gradient_accumulation_steps x "
                       "processes the same",
       "block_size": "use the same --block_size", "tokenizer": "use the same --tokenizer_name"}


def check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    for key, value in saved.items():
        if key not in LAYOUT and current.get(key) != value:
            fix = FIX.get(key, "use the same model configuration")
            if "." in key:  # an option of one of the run's configs
                fix = (f"use the same --{key.partition('.')[2]}, or start a new run in "
                       "another --output_dir")
            if key == "training.optim":  # asked for: the weights go on, the optimizer anew
                fix = (f"use the same --optim, or continue its weights with a new optimizer: "
                       f"--model_name_or_path {path} in another --output_dir")
            raise CheckpointError(f"cannot resume from {path}: it has {key}={value} but this run "
                                  f"has {key}={current.get(key)} ({fix})")


def _dist_ok(backend: Backend, ok: bool) -> bool:
    """True only if every rank reports ok."""
    if backend.topology.distributed:
        flag = torch.tensor([0.0 if ok else 1.0], device=backend.device)
        torch.distributed.all_reduce(flag)
        return flag.item() == 0
    return ok


def save_checkpoint(backend: Backend, model, optimizer, tokenizer, loader, state, meta: dict,
                    output_dir: str | Path, save_total_limit: int | None = None,
                    keep=()) -> Path:
    """Write checkpoints/step-<state.step> on every rank; returns its path.

    A failure on any rank (a full disk, say) removes the partial folder, leaves every earlier
    checkpoint as it was and raises CheckpointError on every rank.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{state.step}"
    tmp = root / f".step-{state.step}.tmp"
    if final.is_dir() and verify(final) is None:
        return final
    accelerator, main = backend.accelerator, backend.topology.is_main
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    plain = backend.full_model(model)  # collective: the backend gathers sharded weights
    error = None
    try:
        faults.at("save", state.step)  # CLM_FAULTS (tests, bench/chaos.py) only
        backend.save_state(model, optimizer, tmp / "state")
        faults.at("save_written", state.step)
        _write_json(tmp / "state" / f"data_rank{backend.topology.dp_rank}.json",
                    loader.state_dict())
        if main:
            save_model_folder(plain, tokenizer, tmp)
            _write_json(tmp / "trainer_state.json",
                        {"loop": dataclasses.asdict(state), **meta})
    except Exception as e:  # of any kind: every rank must hear of it, or the others hang
        error = e
    if not _dist_ok(backend, error is None):
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        reason = _first_reason(backend, _reason(error))
        previous = [p.name for p in list_checkpoints(output_dir) if verify(p) is None]
        kept = f"{previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"could not save checkpoint {final.name}: {reason} "
                              f"(free disk space or change --output_dir; {kept})")
    if main:
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*"))
                 if f.is_file()}
        for rel in files:
            _fsync(tmp / rel)
        # the backend that wrote state/: what export reads the weights back with
        _write_json(tmp / MANIFEST, {"step": state.step, "backend": backend.name,
                                     "files": files})
        if final.exists():  # a damaged leftover of an earlier attempt at this step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root)
        rotate(output_dir, save_total_limit, keep)
    accelerator.wait_for_everyone()
    return final


def _first_reason(backend: Backend, reason: str) -> str:
    """The first failing rank's reason, told to every rank (a failed save only: a collective
    of strings), so that each one prints the same line."""
    if not backend.topology.distributed:
        return reason
    reasons = [None] * backend.topology.world_size
    torch.distributed.all_gather_object(reasons, reason)
    rank, first = next((r, x) for r, x in enumerate(reasons) if x)
    return f"{first} on rank {rank}"


def _reason(error: Exception | None) -> str:
    if error is None:
        return ""
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno)
    # an OS error reported through a library (safetensors: "I/O error: ... (os error 28)")
    found = re.search(r"(?:os error |\[Errno )(\d+)", str(error))
    if found:
        return os.strerror(int(found.group(1)))
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0]}" if first else type(error).__name__


def rotate(output_dir: str | Path, limit: int | None, keep=()) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit`; the newest complete one always stays, and
    so does every folder in `keep` (still being uploaded to the Hub)."""
    if not limit:
        return []
    keep = {Path(k).resolve() for k in keep}
    complete = [p for p in list_checkpoints(output_dir) if verify(p) is None]
    doomed = complete[:-limit] if len(complete) > limit else []
    doomed = [p for p in doomed if p.resolve() not in keep]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def load_checkpoint(backend: Backend, model, optimizer, path: Path, loader) -> dict:
    """Restore model, optimizer, RNG and the data state; returns trainer_state.json.

    The checkpoint may come from another number of processes: the backend re-shards the model
    and optimizer, and the loader gets every saved rank's data state to continue from
    (`restore`; one without it must be resumed on the saved number of processes)."""
    trainer_state = read_trainer_state(path)
    saved_world = trainer_state.get("fingerprint", {}).get("world_size")
    backend.load_state(model, optimizer, path / "state", saved_world_size=saved_world)
    topology = backend.topology
    files = sorted(path.glob("state/data_rank*.json"), key=lambda f: int(f.stem[9:]))
    states = [json.loads(f.read_text()) for f in files]
    if hasattr(loader, "restore"):
        line = loader.restore(states)
        if line and topology.is_main:
            print(line)
    elif len(states) == topology.dp_world_size:
        loader.load_state_dict(states[topology.dp_rank])
    else:
        raise CheckpointError(f"checkpoint {path} has data states for {len(states)} processes "
                              f"and this data cannot be dealt to {topology.dp_world_size} "
                              f"(resume with {len(states)} processes)")
    return trainer_state


def read_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())

