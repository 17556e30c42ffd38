"""Faults made on purpose, for the failure tests and bench/chaos.py: CLM_FAULTS names them.

    CLM_FAULTS="kill:rank=1,step=6" torchrun --standalone --nproc_per_node 2 --max-restarts 1 train_clm.py --config configs/demo_cpu.yaml --save_steps 4

Each fault is `kind:key=value,...`; several are separated by ';'. A fault fires on the rank it
names (`rank=R`, every rank if none) at its step, once per output folder: the firing rank notes
it in `<output_dir>/.faults_fired` first, so a restarted job that redoes the step goes past it
(torchrun's restart counts differ between nodes, so they cannot tell):

    kill:step=N             SIGKILL after optimizer step N (and its checkpoint, if one is due)
    hang:step=N,seconds=S   sleep S seconds (default: for ever) in step N's data read
    nan:step=N              a NaN loss in step N's forward (a bad step, skipped)
    fsize:step=N,bytes=B    the kernel's file-size limit (RLIMIT_FSIZE) set to B bytes as the
                            checkpoint of step N starts: its larger files fail with EFBIG, as on
                            a full disk
    readonly:step=N         the checkpoint of step N fails with EROFS after the backend wrote
                            its state, as on a filesystem remounted read-only

Unset, every hook is one dictionary lookup. Nothing here runs unless the variable is set.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

ENV = "CLM_FAULTS"
KINDS = {"kill": "step", "hang": "data", "nan": "forward", "fsize": "save",
         "readonly": "save_written"}


FIRED = ".faults_fired"


@dataclass
class Fault:
    kind: str
    step: int
    rank: int | None = None
    args: dict = field(default_factory=dict)
    index: int = 0


def parse(spec: str) -> list[Fault]:
    faults = []
    for item in filter(None, (x.strip() for x in spec.split(";"))):
        kind, _, rest = item.partition(":")
        if kind not in KINDS:
            raise UsageError(f"{ENV}: unknown fault '{kind}' (choose from {', '.join(KINDS)})")
        try:
            args = {k.strip(): int(v) for k, v in
                    (kv.split("=", 1) for kv in filter(None, rest.split(",")))}
        except ValueError:
            raise UsageError(f"{ENV}: cannot read '{item}' (write kind:step=N,rank=R)") from None
        if "step" not in args:
            raise UsageError(f"{ENV}: '{item}' names no step (add step=N)")
        faults.append(Fault(kind, args.pop("step"), args.pop("rank", None), args,
                            len(faults)))
    return faults


_FAULTS: list[Fault] = parse(os.environ.get(ENV, ""))
_STEP = 0  # the step being taken (set at its data read)
_DIR: Path | None = None  # the output folder, where fired faults are noted
_RANK = 0


def configure(output_dir, rank: int = 0) -> None:
    """This process's rank, and where the faults that fired are noted (the output folder)."""
    global _DIR, _RANK
    _DIR, _RANK = (Path(output_dir) if output_dir is not None else None), rank


def active() -> bool:
    return bool(_FAULTS)


def reload(environ=None) -> None:
    """Read CLM_FAULTS again (tests that set it in this process)."""
    global _FAULTS
    _FAULTS = parse((os.environ if environ is None else environ).get(ENV, ""))


def _due(point: str, step: int):
    rank = _RANK
    for fault in _FAULTS:
        if KINDS[fault.kind] == point and fault.step == step and fault.rank in (None, rank):
            note = _DIR / FIRED if _DIR else None
            seen = note.read_text().split() if note and note.is_file() else []
            if f"{fault.index}@{rank}" in seen:
                continue
            if note:
                with open(note, "a") as f:
                    f.write(f"{fault.index}@{rank}\n")
                    f.flush()
                    os.fsync(f.fileno())
            yield fault


def at(point: str, step: int) -> None:
    """The hook at `point` ('data', 'step', 'save', 'save_written') of optimizer step `step`."""
    global _STEP
    if not _FAULTS:
        return
    if point == "data":
        _STEP = step
    for fault in _due(point, step):
        if fault.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.kind == "hang":
            time.sleep(fault.args.get("seconds", 10**9))
        elif fault.kind == "fsize":
            # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fault.args.get("bytes", 0), hard))
        elif fault.kind == "readonly":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))


def install(model) -> None:
    """Under a `nan` fault, a hook on the output layer that makes that step's loss NaN."""
    if not any(f.kind == "nan" for f in _FAULTS):
        return

    def poison(module, inputs, output):
        if module.training and any(True for _ in _due("forward", _STEP)):
            return output * float("nan")
        return output

    model.get_output_embeddings().register_forward_hook(poison)
