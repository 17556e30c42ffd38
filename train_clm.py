"""Pretrain a GPT-2 from scratch (or continue pretraining one) on streamed, packed text.

    python train_clm.py --config configs/demo_cpu.yaml                        # the CPU demo
    python train_clm.py --config configs/demo_cpu.yaml --resume_from_checkpoint latest  # continue it
    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml --output_dir outputs/ddp
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml train_clm.py --config configs/gpt2_124m_owt.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml train_clm.py --config configs/gpt2_124m_owt.yaml
    python train_clm.py --config configs/gpt2_124m_owt.yaml --dry_run --dry_run_num_gpus 8   # the plan: memory, time
    python train_clm.py --config configs/gpt2_124m_owt.yaml --eval_tasks hellaswag --eval_tasks_limit 1000

Every option can come from `--config FILE.yaml` and be overridden on the command line; see
`--help`. The output folder is a plain Hugging Face model folder plus metrics.jsonl,
loss_curve.png, samples.txt, run_config.yaml and a model card.
"""

from __future__ import annotations

from clm.config import DataConfig, ModelConfig, TrainingConfig, UsageError, run_cli
from clm.evaluate import BenchmarkEvalConfig


def main(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig,
         bench_cfg: BenchmarkEvalConfig | None = None, batches=None) -> dict:
    """Train and write the output folder; `batches` (benchmarks) replaces the training stream
    with any endless iterable of batches that has state_dict/load_state_dict."""
    from clm.parallel.launch import Topology, resolve_mixed_precision

    # --- check everything the user gave us before any work
    train_cfg.mixed_precision = resolve_mixed_precision(train_cfg.mixed_precision)
    topology = Topology.from_launcher()  # this process's ranks, made once and passed along
    if train_cfg.dry_run:  # the plan only: no data, tokenizer, weights or output folder touched
        from clm import plan

        return plan.print_plan(data_cfg, model_cfg, train_cfg, topology)

    from accelerate.utils import set_seed

    from clm import checkpoint as ckpt, data, model as models, outputs, runtime, session
    from clm.evaluate import make_benchmark_eval

    resume = session.check_output(train_cfg)
    session.fit_to_world(resume, train_cfg, topology, reshardable=batches is None)
    tokenizer_name = data_cfg.tokenizer_name or model_cfg.model_name_or_path
    if not tokenizer_name:
        raise UsageError("no tokenizer (pass --tokenizer_name, e.g. gpt2 or a local folder)")
    tokenizer = data.load_tokenizer(tokenizer_name)
    bench_cfg = bench_cfg or BenchmarkEvalConfig()
    benchmarks = make_benchmark_eval(bench_cfg, tokenizer, train_cfg.per_device_eval_batch_size)
    backend = runtime.start(train_cfg, topology)
    set_seed(train_cfg.seed)
    model = models.build_model(model_cfg, tokenizer, data_cfg.block_size)
    if train_cfg.gradient_checkpointing:
        models.enable_gradient_checkpointing(model)
    rank, world = topology.dp_rank, topology.dp_world_size
    global_batch = train_cfg.per_device_train_batch_size * train_cfg.gradient_accumulation_steps
    fingerprint = ckpt.fingerprint(model, tokenizer, data_cfg.block_size, global_batch * world,
                                   world, data_cfg.dataloader_num_workers,
                                   ckpt.data_identity(data_cfg, ckpt.PRETRAIN_DATA))
    session.check_resume(resume, fingerprint)
    source = data.open_source(data_cfg, "train")
    if batches is None:
        batches = data.train_loader(data_cfg, tokenizer, train_cfg.per_device_train_batch_size,
                                    train_cfg.seed, rank, world, source)
        warning = data.few_shards_warning(source.num_shards, world,
                                          data_cfg.dataloader_num_workers)
        if warning and rank == 0:
            print(warning)
    heldout = data.validation_blocks(data_cfg, tokenizer, source, rank, world)

    # --- the run itself: the same for pretraining and finetuning
    run = outputs.resolved_config({"data": data_cfg, "model": model_cfg, "training": train_cfg,
                                   "evaluation": bench_cfg}, model, world, train_cfg,
                                  data_cfg.block_size)
    return session.run_training(backend, train_cfg, model, tokenizer, batches, heldout, run,
                                fingerprint, resume, data_cfg.block_size,
                                extra_evals=[benchmarks] if benchmarks else [])


if __name__ == "__main__":
    run_cli(main, [DataConfig, ModelConfig, TrainingConfig, BenchmarkEvalConfig], description=__doc__.splitlines()[0])
