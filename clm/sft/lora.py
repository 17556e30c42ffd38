"""LoRA adapters for finetuning (`--use_peft`): checked against the model, added, merged.

    python finetune/run_sft.py --config configs/sft_demo.yaml --use_peft --lora_r 8 --lora_alpha 16
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import _help
from ..errors import UsageError

@dataclass
class LoraArgs:
    """LoRA adapters (peft): train small low-rank updates, the base weights frozen."""

    use_peft: bool = _help("Train LoRA adapters instead of every weight.", default=False)
    lora_r: int = _help("Adapter rank.", default=16)
    lora_alpha: int = _help("Adapter scale numerator (the update is scaled by alpha / r).",
                            default=32)
    lora_dropout: float = _help("Dropout on the adapters' input.", default=0.05)
    lora_target_modules: Optional[list[str]] = _help(
        "Modules to adapt (default: GPT-2's c_attn, c_proj and c_fc; all-linear elsewhere).",
        default=None)
    merge_adapters: bool = _help(
        "Write the final folder as a plain model with the adapters merged in (the adapters "
        "alone go to adapter/); false: the final folder holds the adapters only.", default=True)

    def __post_init__(self):
        if self.lora_r < 1 or self.lora_alpha <= 0:
            raise UsageError(f"--lora_r must be >= 1 and --lora_alpha > 0 (got {self.lora_r}, "
                             f"{self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")


GPT2_LORA_TARGETS = ["c_attn", "c_proj", "c_fc"]


def check_lora_targets(model_name_or_path: str, args: LoraArgs) -> None:
    """Refuse --lora_target_modules the model does not have, before its weights load."""
    if not args.use_peft or not args.lora_target_modules:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except Exception:
        return  # build_model reports an unloadable model in its own words
    with torch.device("meta"):  # the module tree without memory or initialisation
        names = {n.rsplit(".", 1)[-1] for n, _ in
                 AutoModelForCausalLM.from_config(config).named_modules()}
    unknown = [t for t in args.lora_target_modules if t not in names and t != "all-linear"]
    if unknown:
        raise UsageError(f"--lora_target_modules {unknown}: no such modules in "
                         f"{model_name_or_path} (for GPT-2: {' '.join(GPT2_LORA_TARGETS)})")


def add_lora(model, args: LoraArgs):
    """`model` wrapped with fresh LoRA adapters; only they require gradients."""
    from peft import LoraConfig, get_peft_model

    gpt2 = model.config.model_type == "gpt2"
    targets = args.lora_target_modules or (GPT2_LORA_TARGETS if gpt2 else "all-linear")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=targets,
                        fan_in_fan_out=gpt2,  # GPT-2's Conv1D stores weights transposed
                        task_type="CAUSAL_LM")
    # adapter_config.json names the base by model.name_or_path: a local folder is written as
    # an absolute path, so the adapters load from any working directory
    if model.name_or_path and os.path.isdir(model.name_or_path):
        model.name_or_path = os.path.abspath(model.name_or_path)
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise UsageError(f"--lora_target_modules {targets}: {str(e).splitlines()[0]} (name "
                         "modules of this model)") from None


def merge_lora(model, tokenizer, output_dir):
    """Save the adapters to output_dir/adapter, with the tokenizer and its chat template (so
    the folder is usable on its own), then return the model with them merged in."""
    from pathlib import Path

    from ..checkpoint import save_model_folder

    save_model_folder(model, tokenizer, Path(output_dir) / "adapter")
    return model.merge_and_unload()
