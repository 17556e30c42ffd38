"""Turn a training checkpoint or a LoRA adapter folder into a plain Hugging Face model folder.

    python -m clm.export outputs/demo/checkpoints/step-200 exported/demo-step-200
    python -m clm.export outputs/sft_lora exported/sft_lora      # a --merge_adapters false run

A checkpoint's weights are read from its training state (`state/`, what a resume loads), not
copied from the HF files beside it, so the export is exactly the model training would continue
from. The manifest names the backend that wrote the state, and that backend reads it back
(clm.parallel, `weights_from_state`): `state/model.safetensors` for DDP and single-process
runs, and for DeepSpeed ZeRO-1/2/3 the fp32 master weights, whose partitions (one file per rank) are gathered back into whole
tensors by DeepSpeed's own reader; for FSDP2 the torch.distributed.checkpoint folder
(`state/dcp/`), read whole by torch's format converter. No GPU or process group is needed. A LoRA
finetune's checkpoint is exported with its adapters merged into the base weights. The folder
gets the checkpoint's config, generation config and tokenizer.

Model folders are read by `load_plain_model`, which generate.py uses too: a plain one as it is,
a peft adapter folder (a LoRA checkpoint, a `--merge_adapters false` run, `adapter/`) as the base
model its adapter_config.json names with the adapters merged in. Export reads a folder without
training state that way, so it is a plain model folder that needs neither peft nor the base.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from .checkpoint import MANIFEST, read_manifest, save_model_folder, step_folders, verify
from .errors import UsageError, first_line

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


# ----------------------------------------------------------------------------- model folders

def holds(folder: Path) -> str | None:
    """"model" (config and weights), "adapter" (peft adapters and their config) or None."""
    if (folder / "config.json").is_file() and any((folder / f).is_file() for f in WEIGHT_FILES):
        return "model"
    if (folder / "adapter_config.json").is_file() and \
            any((folder / f).is_file() for f in ADAPTER_FILES):
        return "adapter"
    return None


def no_model_error(folder: Path, arg: str) -> UsageError:
    """The error for a folder without a model: what it holds instead, and what to pass."""
    fix = "pass a folder written by train_clm.py or run_sft.py, or a checkpoints/step-N folder"
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    steps = step_folders(folder) or step_folders(folder / "checkpoints")
    if steps:  # a run's folder before its final model is written, or its checkpoints/
        nested = "" if steps[0].parent == folder else " under checkpoints/"
        found = f"{len(steps)} checkpoint folder{'s' * (len(steps) > 1)}{nested}"
        usable = [p for p in steps if holds(p)] or steps
        fix = f"pass it: {usable[-1]}" if len(steps) == 1 else \
            f"pass one of them, e.g. the newest: {usable[-1]}"
    elif not names:
        found = "nothing, the folder is empty"
    elif "config.json" in names:
        found = f"config.json but no weights ({' or '.join(WEIGHT_FILES[::2])})"
    elif "adapter_config.json" in names:
        found = f"adapter_config.json but no adapter weights ({ADAPTER_FILES[0]})"
    elif (folder / "state").is_dir():
        found = "training state only"
        fix = f"export it first: python -m clm.export {folder} OUT"
    elif all(n in TOKENIZER_FILES for n in names):
        found = "tokenizer files only"
    else:
        found = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
    return UsageError(f"{arg}{folder} holds no model: found {found} ({fix})")


def _load_adapters(folder: Path, arg: str, dtype):
    """The base model that folder's adapter_config.json names, with the adapters merged in."""
    import torch
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base_name = PeftConfig.from_pretrained(folder).base_model_name_or_path
    except Exception as e:
        raise UsageError(f"{arg}{folder}: unreadable adapter_config.json: {first_line(e)} "
                         "(pass a folder written by run_sft.py --use_peft)") from None
    try:
        # merged in float32 whatever the run's dtype: the low-rank update is small next to the
        # weights it is added to, and half precision would round much of it away
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
    except Exception as e:
        raise UsageError(f"{arg}{folder} holds LoRA adapters for the base model {base_name}, "
                         f"which could not be loaded: {first_line(e)} (put that model back, or "
                         f"set base_model_name_or_path in {folder / 'adapter_config.json'})"
                         ) from None
    try:
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    except Exception as e:
        raise UsageError(f"{arg}{folder}: the adapters do not fit their base model {base_name}: "
                         f"{first_line(e)} (pass the base they were trained on)") from None
    return (model if dtype is None else model.to(dtype)), base_name


def load_plain_model(name: str, dtype=None, arg: str = "--model "):
    """(model, tokenizer) from a model folder, a folder of peft adapters (merged into the base
    model they name) or a Hub name; a folder without a model is a UsageError saying what it
    holds. `arg` names the option in errors; `dtype` None keeps what the files hold (float32
    for merged adapters)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(name)
    if not path.exists() and (path.is_absolute() or name.startswith((".", "~"))):
        # not a Hub name either: say so rather than relay the Hub client's complaint about it
        raise UsageError(f"{arg}{name}: no such folder (check the path)")
    kind = holds(path) if path.is_dir() else "model"
    if kind is None:
        raise no_model_error(path, arg)
    tokenizer_from = name
    if kind == "adapter":
        model, base_name = _load_adapters(path, arg, dtype)
        # adapter/ of a merged run has no tokenizer: the run's, beside it, carries the chat
        # template the finetune used; the base's is the last resort
        places = [path, path.parent] if path.name == "adapter" else [path]
        tokenizer_from = next((str(p) for p in places
                               if any((p / f).is_file() for f in TOKENIZER_FILES)), base_name)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype or "auto")
        except Exception as e:
            raise UsageError(f"could not load {arg}{name}: {first_line(e)} (pass a model "
                             "folder or a Hub name)") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    except Exception as e:
        raise UsageError(f"could not load the tokenizer of {arg}{name} from {tokenizer_from}: "
                         f"{first_line(e)} (pass a folder with tokenizer files)") from None
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- checkpoints

def is_checkpoint(folder: Path) -> bool:
    """A training checkpoint (complete or not), rather than a model folder."""
    return (folder / MANIFEST).is_file() or (folder / "state").is_dir()


def load_training_weights(checkpoint: Path):
    """The model of a checkpoint, built from its config and its training-state weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from .parallel import BACKENDS

    problem = verify(checkpoint)
    if problem:
        raise UsageError(f"checkpoint {checkpoint} is damaged: {problem} (export an earlier "
                         "checkpoint)")
    name = read_manifest(checkpoint).get("backend")
    if name not in BACKENDS:
        raise UsageError(f"checkpoint {checkpoint}'s manifest names no backend this version "
                         f"reads ({name!r}; known: {', '.join(BACKENDS)}): export it with the "
                         "version that wrote it")
    state = BACKENDS[name].weights_from_state(checkpoint / "state")
    # a run with --torch_compile may have saved the compiled wrapper's names
    state = {k.removeprefix("_orig_mod."): v for k, v in state.items()}
    lora = (checkpoint / "adapter_config.json").is_file()
    if lora:  # a LoRA finetune: the state holds base and adapters; they are merged
        from peft import PeftConfig, get_peft_model

        peft_config = PeftConfig.from_pretrained(checkpoint)
        base = peft_config.base_model_name_or_path
        try:  # only the base's config: its weights are in the state
            config = AutoConfig.from_pretrained(base)
        except Exception as e:
            raise UsageError(f"checkpoint {checkpoint} holds LoRA adapters for the base model "
                             f"{base}, whose config could not be loaded: {first_line(e)} (put "
                             "that model back)") from None
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
        raise UsageError(f"{checkpoint} is not a folder (pass a checkpoints/step-N folder or a "
                         "model folder)")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} is not empty (choose a new folder)")
    if is_checkpoint(checkpoint):
        model = load_training_weights(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    else:
        model, tokenizer = load_plain_model(str(checkpoint), arg="")
    return save_model_folder(model, tokenizer, out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a checkpoints/step-N folder, or a model or LoRA adapter "
                                      "folder (the adapters are merged into their base)")
    p.add_argument("out", help="new folder for the exported model")
    args = p.parse_args(argv)
    try:
        print(f"exported {args.checkpoint} to {export(args.checkpoint, args.out)}")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
