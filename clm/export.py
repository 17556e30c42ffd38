"""Turn a training checkpoint into a plain Hugging Face model folder.

    python -m clm.export outputs/demo/checkpoints/step-200 exported/demo-step-200

The weights are read from the checkpoint's training state (`state/`, what a resume loads), not
copied from the HF files beside it, so the export is exactly the model training would continue
from: `state/model.safetensors` for DDP and single-process runs, and for DeepSpeed ZeRO-1/2/3
the fp32 master weights, whose partitions (one file per rank) are gathered back into whole
tensors by DeepSpeed's own reader. No GPU or process group is needed for either. A LoRA
finetune's checkpoint is exported with its adapters merged into the base weights. The folder
gets the checkpoint's config, generation config and tokenizer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import save_model_folder, verify
from .config import UsageError


ZERO_TAG = "pytorch_model"  # the tag Accelerate's save_state gives DeepSpeed checkpoints


def _zero_weights(state_dir: Path) -> dict:
    """fp32 weights of a DeepSpeed ZeRO checkpoint, its per-rank partitions joined."""
    from .runtime import deepspeed_device

    deepspeed_device()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(state_dir), tag=ZERO_TAG)


def load_training_weights(checkpoint: Path):
    """The model of a checkpoint, built from its config and its training-state weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    problem = verify(checkpoint)
    if problem:
        raise UsageError(f"checkpoint {checkpoint} is damaged: {problem} (export an earlier "
                         "checkpoint)")
    state_dir = checkpoint / "state"
    if (state_dir / "model.safetensors").is_file():
        state = load_file(state_dir / "model.safetensors")
    elif list(state_dir.glob(f"{ZERO_TAG}/*_model_states.pt")):
        state = _zero_weights(state_dir)
    else:
        raise UsageError(f"checkpoint {checkpoint} has neither state/model.safetensors nor "
                         f"DeepSpeed state/{ZERO_TAG}/ files (FSDP states are not supported by "
                         "this exporter)")
    # a run with --torch_compile may have saved the compiled wrapper's names
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    lora = (checkpoint / "adapter_config.json").is_file()
    if lora:  # a LoRA finetune: the state holds base and adapters; they are merged
        from peft import PeftConfig, get_peft_model

        peft_config = PeftConfig.from_pretrained(checkpoint)
        base = peft_config.base_model_name_or_path
        config = AutoConfig.from_pretrained(base)
        model = get_peft_model(AutoModelForCausalLM.from_config(config), peft_config)
    else:
        base = checkpoint
        config = AutoConfig.from_pretrained(checkpoint)
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} \
        if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise UsageError(f"checkpoint {checkpoint} does not match its config: missing "
                         f"{sorted(set(missing) - tied)}, unexpected {sorted(unexpected)}")
    model.tie_weights()
    if lora:
        model = model.merge_and_unload()
    model.generation_config = GenerationConfig.from_pretrained(base)
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
