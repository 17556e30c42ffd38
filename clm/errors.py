"""The two errors an entry point turns into one line (`error: <what> (<how to fix>)`), and the
helper that shortens any exception to its first line for them.

    python train_clm.py --config configs/demo_cpu.yaml --block_size 0   # error: ..., exit 2

Every module below the entry points raises these; `config.run_cli` prints them. They live alone
here so that the lowest modules (the process topology, the configs) can raise them without
importing each other.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: printed as `error: <message>` with exit code 2, no traceback."""


class TrainingError(RuntimeError):
    """A run that cannot go on (--max_bad_steps non-finite steps in a row): printed as
    `error: <message>` with exit code 1, no traceback. Raised on every rank at the same step
    (decided on values summed over the ranks), so the ranks leave the process group together;
    the checkpoints already saved are left as they are."""


def first_line(e: BaseException) -> str:
    """An exception's first line (its type's name when it has no message), for one-line errors."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
