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

from clm.config import DataConfig, ModelConfig, TrainingConfig, run_cli
from clm.evaluate import BenchmarkEvalConfig


def main(data_cfg: DataConfig, model_cfg: ModelConfig, train_cfg: TrainingConfig,
         bench_cfg: BenchmarkEvalConfig | None = None, batches=None) -> dict:
    """Train and write the output folder; `batches` (benchmarks) replaces the training stream
    with any endless iterable of batches that has state_dict/load_state_dict."""
    from clm import session

    # --- check everything the user gave us before any work
    topology = session.launch(train_cfg)
    if train_cfg.dry_run:  # the plan only: no data, tokenizer, weights or output folder touched
        from clm import plan

        return plan.print_plan(data_cfg, model_cfg, train_cfg, topology)

    from clm import data, runtime
    from clm.evaluate import make_benchmark_eval

    resume = session.check_output(train_cfg, topology, reshardable=batches is None)
    tokenizer = session.load_tokenizer(data_cfg, model_cfg)
    bench_cfg = bench_cfg or BenchmarkEvalConfig()
    benchmarks = make_benchmark_eval(bench_cfg, tokenizer, train_cfg.per_device_eval_batch_size)
    backend = runtime.start(train_cfg, topology)
    configs = {"data": data_cfg, "model": model_cfg, "training": train_cfg,
               "evaluation": bench_cfg}
    model, fingerprint = session.build_model(backend, configs, tokenizer, data_cfg.block_size,
                                             resume, data_cfg.dataloader_num_workers)
    rank, world = topology.dp_rank, topology.dp_world_size
    source = data.open_source(data_cfg, "train")
    if batches is None:
        batches = data.train_loader(data_cfg, tokenizer, train_cfg.per_device_train_batch_size,
                                    train_cfg.seed, rank, world, source)
        warning = data.few_shards_warning(source.num_shards, world,
                                          data_cfg.dataloader_num_workers)
        if warning and topology.is_main:
            print(warning)
    heldout = data.validation_blocks(data_cfg, tokenizer, source, rank, world)

    # --- the run itself: the same for pretraining and finetuning
    return session.run_training(backend, configs, model, tokenizer, batches, heldout,
                                fingerprint, resume,
                                extra_evals=[benchmarks] if benchmarks else [])


if __name__ == "__main__":
    run_cli(main, [DataConfig, ModelConfig, TrainingConfig, BenchmarkEvalConfig], description=__doc__.splitlines()[0])
