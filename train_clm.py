"""Pretrain a GPT-2 from scratch (or continue pretraining one) on streamed, packed text.

    python train_clm.py --config configs/demo_cpu.yaml                        # the CPU demo
    python train_clm.py --config configs/demo_cpu.yaml --resume_from_checkpoint latest  # continue it
    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --output_dir outputs/ddp
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_clm.py --config configs/gpt2_124m_owt.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_clm.py --config configs/gpt2_124m_owt.yaml

Every option can come from `--config FILE.yaml` and be overridden on the command line; see
`--help`. The output folder is a plain Hugging Face model folder plus metrics.jsonl,
loss_curve.png, samples.txt, run_config.yaml and a model card.
"""

from __future__ import annotations

from pathlib import Path

import torch

from clm.config import DataConfig, ModelConfig, TrainingConfig, UsageError, run_cli


def main(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig) -> dict:
    from accelerate.utils import set_seed

    from clm import checkpoint as ckpt, data, hub, loop, model as models, outputs, runtime
    from clm.metrics import MetricsLogger, flat_config, wandb_run_id

    # --- check everything the user gave us before any work
    out = Path(train_cfg.output_dir)
    resume = train_cfg.resume_from_checkpoint
    if resume:
        resume = ckpt.resolve_resume(out, resume)
    else:
        outputs.check_output_dir(train_cfg.output_dir, train_cfg.overwrite_output_dir)
    tokenizer_name = data_cfg.tokenizer_name or model_cfg.model_name_or_path
    if not tokenizer_name:
        raise UsageError("no tokenizer (pass --tokenizer_name, e.g. gpt2 or a local folder)")
    tokenizer = data.load_tokenizer(tokenizer_name)
    accelerator = runtime.make_accelerator(train_cfg)
    set_seed(train_cfg.seed)
    model = models.build_model(model_cfg, tokenizer, data_cfg.block_size)
    rank, world = runtime.dist_info()
    global_batch = train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps
    fingerprint = ckpt.fingerprint(model, tokenizer, data_cfg.block_size, global_batch * world,
                                   world, data_cfg.dataloader_num_workers)
    if resume:
        ckpt.check_fingerprint(ckpt.read_trainer_state(resume)["fingerprint"], fingerprint,
                               resume)
    source = data.open_source(data_cfg, "train")
    batches = data.train_loader(data_cfg, tokenizer, train_cfg.per_device_train_batch_size,
                                train_cfg.seed, rank, world, source)
    heldout = data.validation_blocks(data_cfg, tokenizer, source)

    # --- set up (or restore) the run
    run = outputs.resolved_config({"data": data_cfg, "model": model_cfg, "training": train_cfg},
                                  model, world, train_cfg, data_cfg.block_size)
    run["name"] = train_cfg.run_name or out.resolve().name
    fpt = models.flops_per_token(model, data_cfg.block_size)
    optimizer = loop.make_optimizer(model, train_cfg)
    if train_cfg.torch_compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    run["distributed"] = runtime.describe(accelerator)
    state, tracker_id = loop.LoopState(), None
    if resume:
        saved = ckpt.load_checkpoint(accelerator, resume, batches)
        state, tracker_id = loop.LoopState(**saved["loop"]), saved.get("tracker_id")
        if accelerator.is_main_process:
            outputs.truncate_metrics(out, state.step)
            print(f"resumed from {resume} at step {state.step} ({state.tokens:,} tokens)")
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        outputs.clear_run_files(train_cfg.output_dir)
    if accelerator.is_main_process:
        outputs.write_yaml(out / "run_config.yaml", run)
    wandb_kwargs = {"name": run["name"], "dir": str(out)}
    if tracker_id:  # the same wandb run continues
        wandb_kwargs.update(id=tracker_id, resume="allow")
    accelerator.init_trackers(run["name"], config=flat_config(run),
                              init_kwargs={"wandb": wandb_kwargs})
    tracker_id = tracker_id or wandb_run_id(accelerator)
    logger = MetricsLogger(out, accelerator, train_cfg.max_steps, start_step=state.step)
    evaluate = lambda: loop.evaluate(model, heldout, train_cfg.per_device_eval_batch_size,  # noqa
                                     accelerator)
    pusher = hub.HubPusher(train_cfg.hub_model_id, train_cfg.hub_private_repo) \
        if train_cfg.push_to_hub and accelerator.is_main_process else None

    def save(st):
        path = ckpt.save_checkpoint(
            accelerator, model, tokenizer, batches, st,
            {"fingerprint": fingerprint, "tracker_id": tracker_id, "run_config": run}, out,
            train_cfg.save_total_limit)
        if pusher and train_cfg.hub_strategy == "every_save":
            pusher.push(path, f"step-{st.step}", f"checkpoint at step {st.step}")
    if heldout is not None and not resume:  # the untrained baseline, as nanoGPT users expect
        logger.log_eval(0, 0, evaluate())

    # --- train until done or told to stop
    with runtime.StopRequest() as stop:
        try:
            loop.train(train_cfg, accelerator, model, optimizer, batches, state, logger,
                       evaluate, save_fn=save, stop=stop, flops_per_token=fpt,
                       peak_flops=models.peak_flops(accelerator.device))
        finally:  # end the progress bar's line, so an error prints on a line of its own
            logger.close()
    run.update(step=state.step, tokens=state.tokens, elapsed_s=state.elapsed_s,
               skipped_steps=state.skipped)
    if stop.signal_name:
        if accelerator.is_main_process:
            print(f"stopped by {stop.signal_name} at step {state.step}: checkpoint saved in "
                  f"{ckpt.checkpoint_root(out)}/step-{state.step}. To continue, run the same "
                  "command with --resume_from_checkpoint latest")
        if pusher:
            pusher.finish_and_report(timeout=120)
        accelerator.end_training()
        return {**run, "stopped": stop.signal_name}

    # --- outputs
    accelerator.wait_for_everyone()
    evals = [r for r in outputs.read_metrics(out) if "eval_loss" in r] \
        if accelerator.is_main_process else []
    run.update(final_eval_loss=evals[-1]["eval_loss"] if evals else None,
               first_eval_loss=evals[0]["eval_loss"] if evals else None)
    final_model = ckpt.full_model(accelerator, model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        samples = outputs.finish_run(train_cfg.output_dir, final_model, tokenizer, run,
                                     train_cfg)
        for text in samples:
            print(f"--- sample\n{text}")
        print(f"\nfinal eval loss {run['final_eval_loss']}, model saved to {out}\n"
              f"load it: python -c \"from transformers import pipeline; "
              f"print(pipeline('text-generation', '{out}')('The')[0]['generated_text'])\"")
        if pusher:
            pusher.push(out, "main", f"final model at step {state.step}", final=True)
            pusher.finish_and_report()
    accelerator.end_training()
    return run


if __name__ == "__main__":
    run_cli(main, [DataConfig, ModelConfig, TrainingConfig], description=__doc__.splitlines()[0])
