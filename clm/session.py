"""One training run, from a built model and data to the output folder: set-up or resume,
trackers, checkpoints, the Hub, the loop, and the final model, samples and card.

    python train_clm.py --config configs/demo_cpu.yaml

Shared by train_clm.py (packed blocks) and finetune/run_sft.py (padded examples): they differ only
in how they build the model and the batches, never in how a run goes.
"""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt, hub, loop, model as models, outputs, runtime
from .backend import backend_of
from .config import TrainingConfig
from .metrics import MetricsLogger, flat_config, wandb_run_id


def check_output(train_cfg: TrainingConfig) -> Path | None:
    """Refuse a bad --output_dir / --resume_from_checkpoint before any work; returns the
    checkpoint to resume from (None for a new run). A checkpoint of another output folder
    continues into --output_dir, which is then guarded like a new run's."""
    if train_cfg.resume_from_checkpoint:
        path = ckpt.resolve_resume(Path(train_cfg.output_dir), train_cfg.resume_from_checkpoint)
        if ckpt.home_of(path) != Path(train_cfg.output_dir).resolve():
            outputs.check_output_dir(train_cfg.output_dir, train_cfg.overwrite_output_dir)
        return path
    outputs.check_output_dir(train_cfg.output_dir, train_cfg.overwrite_output_dir)
    return None


def check_resume(resume: Path | None, fingerprint: dict) -> None:
    if resume:
        ckpt.check_fingerprint(ckpt.read_trainer_state(resume)["fingerprint"], fingerprint,
                               resume)


def run_training(accelerator, train_cfg: TrainingConfig, model, tokenizer, batches, heldout,
                 run: dict, fingerprint: dict, resume: Path | None, seq_len: int,
                 finalize=None, extra_evals=()) -> dict:
    """Train `model` on `batches` (an endless loader with state_dict/load_state_dict) and write
    the output folder; `heldout` is what loop.evaluate takes; `run` the resolved config;
    `finalize(model, output_dir)`, on the main process, turns the trained model into the one
    the final folder holds (finetuning merges LoRA adapters there); `extra_evals`, functions
    `(model, accelerator) -> {"eval_<metric>": ..}`, run beside the held-out loss."""
    out = Path(train_cfg.output_dir)
    run["name"] = train_cfg.run_name or out.resolve().name
    fpt = models.flops_per_token(model, seq_len)
    backend = backend_of(accelerator)
    make_optimizer = lambda m: loop.make_optimizer(m, train_cfg,  # noqa: E731
                                                   fused=backend.fused_optimizer())
    optimizer = make_optimizer(model)
    runtime.choose_attention(accelerator.device, train_cfg.mixed_precision,
                             model.config._attn_implementation,
                             model.config.hidden_size // model.config.num_attention_heads)
    if train_cfg.torch_compile:
        # in place, not a wrapper: saved state keeps the model's own names (no `_orig_mod.`),
        # so a checkpoint resumes with or without --torch_compile
        model.compile()
    loop.compile_loss(train_cfg.torch_compile)
    model, optimizer = backend.prepare(model, optimizer, make_optimizer)
    run["distributed"] = runtime.describe(accelerator)
    state, tracker_id = loop.LoopState(), None
    if resume:
        saved = ckpt.load_checkpoint(accelerator, model, optimizer, resume, batches)
        state, tracker_id = loop.LoopState(**saved["loop"]), saved.get("tracker_id")
        if accelerator.is_main_process:
            outputs.continue_run(out, ckpt.home_of(resume), state.step)
            ckpt.clean_leftovers(out)
            ckpt.set_aside_newer(out, state.step)  # a roll-back starts a new future
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

    def evaluate() -> dict:
        loss = loop.evaluate(model, heldout, train_cfg.per_device_eval_batch_size, accelerator)
        results = {"eval_loss": loss} if loss is not None else {}
        for fn in extra_evals:
            results.update(fn(model, accelerator))
        return results
    pusher = hub.HubPusher(train_cfg.hub_model_id, train_cfg.hub_private_repo) \
        if train_cfg.push_to_hub and accelerator.is_main_process else None

    def save(st):
        path = ckpt.save_checkpoint(
            accelerator, model, optimizer, tokenizer, batches, st,
            {"fingerprint": fingerprint, "tracker_id": tracker_id, "run_config": run}, out,
            train_cfg.save_total_limit, keep=pusher.busy() if pusher else ())
        if pusher and train_cfg.hub_strategy == "every_save":
            pusher.push(path, f"step-{st.step}", f"checkpoint at step {st.step}")
    if (heldout is not None or extra_evals) and not resume:  # the untrained baseline
        logger.log_eval(0, 0, evaluate())

    try:
        return _train_and_finish(accelerator, train_cfg, model, optimizer, tokenizer, batches,
                                 state, logger, evaluate, save, run, out, fpt, pusher, finalize)
    finally:  # on every way out, errors included: what was queued is pushed or reported
        if pusher:
            pusher.finish_and_report(timeout=120)


def _train_and_finish(accelerator, train_cfg, model, optimizer, tokenizer, batches, state,
                      logger, evaluate, save, run, out, fpt, pusher, finalize) -> dict:
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
        accelerator.end_training()
        runtime.close_distributed()
        return {**run, "stopped": stop.signal_name}

    # --- outputs
    accelerator.wait_for_everyone()
    evals = [r for r in outputs.read_metrics(out) if any(k.startswith("eval_") for k in r)] \
        if accelerator.is_main_process else []
    first, last = [{k: v for k, v in r.items() if k.startswith("eval_")} for r in
                   ((evals[0], evals[-1]) if evals else ({}, {}))]
    run.update(final_eval_loss=last.get("eval_loss"), first_eval_loss=first.get("eval_loss"),
               final_eval=last, first_eval=first)
    final_model = ckpt.full_model(accelerator, model)  # collective where sharded
    if accelerator.is_main_process:
        if finalize is not None:
            final_model = finalize(final_model, out)
        samples = outputs.finish_run(train_cfg.output_dir, final_model, tokenizer, run,
                                     train_cfg)
        for text in samples:
            print(f"--- sample\n{text}")
        for key, value in run["final_eval"].items():
            if key not in ("eval_loss", "eval_ppl"):
                before = run["first_eval"].get(key)
                print(f"held-out {key[5:]}: {before:.4f} at the first evaluation, "
                      f"{value:.4f} at step {state.step}")
        print(f"\nfinal eval loss {run['final_eval_loss']}, model saved to {out}\n"
              f"load it: python -c \"from transformers import pipeline; "
              f"print(pipeline('text-generation', '{out}')('The')[0]['generated_text'])\"")
        if pusher:
            pusher.push(out, "main", f"final model at step {state.step}", final=True)
            pusher.finish_and_report()  # no time limit: the final model must go up
    accelerator.end_training()
    runtime.close_distributed()
    return run

