"""Turn a training checkpoint into a plain Hugging Face model folder.

    python -m clm.export outputs/demo/checkpoints/step-200 exported/demo-step-200

The weights are read from the checkpoint's training state (`state/`, what a resume loads), not
copied from the HF files beside it, so the export is exactly the model training would continue
from. The folder gets the checkpoint's config, generation config and tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import save_model_folder, verify
from .config import UsageError


def load_training_weights(checkpoint: Path):
    """The model of a checkpoint, built from its config and its training-state weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    problem = verify(checkpoint)
    if problem:
        raise UsageError(f"checkpoint {checkpoint} is damaged: {problem} (export an earlier "
                         "checkpoint)")
    weights = checkpoint / "state" / "model.safetensors"
    if not weights.is_file():
        raise UsageError(f"checkpoint {checkpoint} has no state/model.safetensors (sharded "
                         "DeepSpeed/FSDP states are not supported by this exporter yet)")
    config = AutoConfig.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_config(config)
    # a run with --torch_compile may have saved the compiled wrapper's names
    state = {k.removeprefix("_orig_mod."): v for k, v in load_file(weights).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UsageError(f"checkpoint {checkpoint} does not match its config: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    model.generation_config = GenerationConfig.from_pretrained(checkpoint)
    return model.eval()


def export(checkpoint: str | Path, out: str | Path) -> Path:
    from transformers import AutoTokenizer

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise UsageError(f"{checkpoint} is not a folder (pass a checkpoints/step-N folder)")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty (choose a new folder)")
    model = load_training_weights(checkpoint)
    return save_model_folder(model, AutoTokenizer.from_pretrained(checkpoint), out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoints/step-N folder")
    p.add_argument("out", help="new folder for the exported model")
    args = p.parse_args(argv)
    try:
        print(f"exported {args.checkpoint} to {export(args.checkpoint, args.out)}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
