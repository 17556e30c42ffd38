"""Saving models as plain Hugging Face folders (loadable by from_pretrained and pipeline).

    python -c "from transformers import pipeline; print(pipeline('text-generation', 'outputs/demo')('The'))"

Files are written into a hidden temporary folder, flushed to disk, then moved into place one
by one with `os.replace`, so a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def save_model_folder(model, tokenizer, dest: str | Path) -> Path:
    """Write `model` (unwrapped) and `tokenizer` into `dest` as safetensors + tokenizer files."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in sorted(tmp.iterdir()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(f, dest / f.name)
    tmp.rmdir()
    return dest
