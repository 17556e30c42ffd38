"""Hang detection: a thread per rank that ends the run when no optimizer step completes in time.

    torchrun --standalone --nproc_per_node 2 --max-restarts 2 train_clm.py --config configs/demo_cpu.yaml --step_timeout 120

A rank that stops making progress (a stalled data read, a stuck collective, a peer that died
or hangs) would otherwise keep the job alive doing nothing until the process group's timeout,
and then fail with a traceback that names no rank. Here each rank's watchdog, once no step has
completed for its limit, writes every thread's Python stack to `<output_dir>/hang-rank<R>.txt`,
prints one line naming the rank, the step and what it was doing (the loop's phase, and where
its main thread is, a collective included), and ends the process (exit 124); torchrun then
stops the other ranks, or restarts the job (`--max-restarts`) from the newest checkpoint.

The limit is `--step_timeout` seconds, or by default MULTIPLE x the median of the last steps'
times, never under FLOOR_S seconds (nor over the process group's timeout). The first step
(compilation, warm-up), an evaluation and a checkpoint get at least FLOOR_S: their time is not
a step's.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import statistics
import sys
import threading
import time
from pathlib import Path

EXIT_CODE = 124
FLOOR_S = 600.0
MULTIPLE = 20
SLOW_PHASES = ("evaluating", "saving a checkpoint")


class Watchdog:
    """`phase(name)` as the loop goes, `beat()` when an optimizer step is done; `close()` at
    the end. The clock also restarts on entering and leaving an evaluation or a save. Setting a
    phase is two attribute writes: no cost per step."""

    def __init__(self, timeout: float | None, output_dir: str | Path, rank: int, world: int,
                 floor: float = FLOOR_S):
        self.timeout, self.floor = timeout, floor
        self.path = Path(output_dir) / f"hang-rank{rank}.txt"
        self.rank, self.world = rank, world
        self.name, self.step = "starting", 0
        self.steps = 0
        self.durations = collections.deque(maxlen=50)
        self.last = time.monotonic()
        self.main = threading.main_thread()
        self._stop = threading.Event()
        self._thread = None
        if timeout != 0:
            self._thread = threading.Thread(target=self._watch, name="clm-watchdog", daemon=True)
            self._thread.start()

    @classmethod
    def off(cls) -> "Watchdog":
        """One that watches nothing (no thread)."""
        return cls(0, ".", 0, 1)

    def phase(self, name: str, step: int) -> None:
        if name in SLOW_PHASES or self.name in SLOW_PHASES:
            self.last = time.monotonic()  # their time is not a step's
        self.name, self.step = name, step

    def beat(self) -> None:
        now = time.monotonic()
        self.steps += 1
        if self.steps > 1:  # the first step's time is compilation's
            self.durations.append(now - self.last)
        self.last = now

    def limit(self) -> float:
        """Seconds without progress that count as a hang, now."""
        slow = self.steps == 0 or self.name in SLOW_PHASES
        if self.timeout is not None:
            return max(self.timeout, self.floor) if slow else self.timeout
        if slow or len(self.durations) < 3:
            return self.floor
        return max(self.floor, MULTIPLE * statistics.median(self.durations))

    def close(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, max(0.2, self.limit() / 20))):
            idle = time.monotonic() - self.last
            if idle > self.limit():
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        where = main_thread_position(self.main)
        try:
            with open(self.path, "w") as f:
                f.write(f"rank {self.rank} of {self.world}: no progress for {idle:.0f} s at step "
                        f"{self.step}, {self.name}\n\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            stacks = f"Python stacks of every thread in {self.path}"
        except OSError as e:
            stacks = f"its stacks could not be written ({os.strerror(e.errno or 0)})"
        how = ("--step_timeout" if self.timeout is not None
               else f"{MULTIPLE} x the median step, at least {self.floor:.0f} s; "
                    "set --step_timeout")
        # (on a line of its own: a progress bar may hold the current one)
        sys.stderr.write(f"\nerror: rank {self.rank} of {self.world} hung: no optimizer step "
                         f"completed in {idle:.0f} s (limit {self.limit():.0f} s: {how}); at "
                         f"step {self.step} it was {self.name}{where}; {stacks}\n")
        sys.stderr.flush()
        # the other ranks' watchdogs fire within a poll of this one: leaving at once would fail
        # their collectives first (a traceback in place of their line)
        time.sleep(min(5.0, max(2.0, self.limit() / 4)))
        os._exit(EXIT_CODE)


def main_thread_position(thread: threading.Thread) -> str:
    """Where `thread` is: inside a torch.distributed collective (and whose call), or its
    innermost frame of this package, or its innermost frame."""
    frame = sys._current_frames().get(thread.ident)
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    if not frames:
        return ""
    ours = next((f for f in frames if f"{os.sep}clm{os.sep}" in f.f_code.co_filename), None)
    dist = next((f for f in frames if f.f_code.co_filename.endswith(
        f"torch{os.sep}distributed{os.sep}distributed_c10d.py") and
        not f.f_code.co_name.startswith("_")), None)
    here = ours or frames[0]
    at = f"{Path(here.f_code.co_filename).name}:{here.f_lineno} {here.f_code.co_name}()"
    if dist is not None:
        return f", waiting in a collective (torch.distributed {dist.f_code.co_name}, from {at})"
    return f", in {at}"
