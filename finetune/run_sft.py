"""Finetune a pretrained causal LM on prompt/completion, chat or plain-text records.

    python finetune/run_sft.py --config configs/sft_demo.yaml
    python finetune/run_sft.py --model_name_or_path gpt2 --train_files data.jsonl --output_dir out/sft
    python finetune/run_sft.py --config configs/sft_demo.yaml --packing --eval_metrics exact_match
    torchrun --standalone --nproc_per_node 2 finetune/run_sft.py --config configs/sft_demo.yaml

The same loop, checkpoints, exact resume, trackers, Hub push and output folder as train_clm.py;
only the batches differ (clm/sft/): padded examples (or, with --packing, rows of several
examples kept apart) whose loss covers completions and assistant turns unless
--completion_only_loss false. --eval_metrics scores greedy completions of held-out prompts
(clm/task_eval.py) at every evaluation, from step 0. --use_peft trains LoRA adapters instead
and, unless --merge_adapters false, writes the final model with them merged in. The optimizer
stays AdamW unless --optim says otherwise: Moonlight found Muon gains nothing when finetuning an
AdamW-pretrained model.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package sits beside finetune/

from clm.config import ModelConfig, TrainingConfig, UsageError, run_cli  # noqa: E402
from clm.sft import LoraArgs, SFTDataConfig  # noqa: E402
from clm.task_eval import GenerationEvalConfig  # noqa: E402


def main(data_cfg: SFTDataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig,
         lora: LoraArgs, eval_cfg: GenerationEvalConfig | None = None) -> dict:
    from clm import runtime, session, sft, task_eval

    # --- check everything the user gave us before any work
    topology = session.launch(train_cfg)
    resume = session.check_output(train_cfg, topology,
                                  reshardable=hasattr(sft.ExampleLoader, "restore"))
    if not model_cfg.model_name_or_path:
        raise UsageError("finetuning needs --model_name_or_path (a Hub name such as gpt2, or a "
                         "folder written by train_clm.py)")
    sft.resolve_block_size(data_cfg, model_cfg.model_name_or_path)
    tokenizer = session.load_tokenizer(data_cfg, model_cfg)
    sft.ensure_chat_template(tokenizer)
    train_records, heldout_records = sft.split_records(data_cfg)
    examples, dropped = sft.tokenize(train_records, tokenizer, data_cfg.block_size,
                                     data_cfg.completion_only_loss)
    heldout, _ = sft.tokenize(heldout_records, tokenizer, data_cfg.block_size,
                              data_cfg.completion_only_loss)
    eval_cfg = eval_cfg or GenerationEvalConfig()
    task_metrics = task_eval.make_eval(eval_cfg, tokenizer, heldout_records, data_cfg.block_size,
                                       train_cfg.per_device_eval_batch_size)
    sft.check_lora_targets(model_cfg.model_name_or_path, lora)
    backend = runtime.start(train_cfg, topology)
    if lora.use_peft and backend.shards_parameters:
        raise UsageError("--use_peft with ZeRO-3 or FSDP is not supported (use "
                         "ds_configs/zero2.json or DDP: the adapters are small)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = sft.ExampleLoader(examples, train_cfg.per_device_train_batch_size, pad,
                                train_cfg.seed, topology.dp_rank, topology.dp_world_size,
                                packing_block_size=data_cfg.block_size if data_cfg.packing else None)
    configs = {"data": data_cfg, "model": model_cfg, "training": train_cfg, "lora": lora,
               "evaluation": eval_cfg}
    model, fingerprint = session.build_model(
        backend, configs, tokenizer, data_cfg.block_size, resume,
        adapt=(lambda m: sft.add_lora(m, lora)) if lora.use_peft else None)
    if dropped and topology.is_main:
        print(f"{dropped} training records had no completion token left within --block_size "
              f"{data_cfg.block_size} and were skipped")

    # --- the run itself: the same as pretraining
    return session.run_training(
        backend, configs, model, tokenizer, batches,
        sft.eval_batches(heldout, train_cfg.per_device_eval_batch_size, pad), fingerprint,
        resume,
        finalize=sft.merge_lora if lora.use_peft and lora.merge_adapters else None,
        extra_evals=[task_metrics] if task_metrics else [],
        task="sft", train_examples=len(examples), heldout_examples=len(heldout),
        skipped_examples=dropped,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad))


if __name__ == "__main__":
    run_cli(main, [SFTDataConfig, ModelConfig, TrainingConfig, LoraArgs, GenerationEvalConfig],
            description=__doc__.splitlines()[0])
