"""Resuming on another number of processes (issue 12, item 6): a 2-process run's checkpoint
continues on 1 process and that run's on 2 again, under DDP, FSDP2 (AdamW and Muon) and DeepSpeed
ZeRO-2/3, with the global batch kept (accumulation recomputed), the model and optimizer
re-sharded and the data dealt again; the final held-out loss is within 1% of the uninterrupted
run's. Also: another number of DataLoader workers."""

import json

import pytest
import torch
import yaml

from helpers import ROOT, metrics, plan_items, run, torchrun, toy_args, world_of

STEPS, HALF = 40, 20


def final_eval(out) -> float:
    return [r for r in metrics(out) if "eval_loss" in r][-1]["eval_loss"]


BACKENDS = {"ddp": [], "fsdp": ["--fsdp", "full_shard"],
            # Muon's momentum buffers are DTensors under FSDP2: re-cut like the weights
            "fsdp_muon": ["--fsdp", "full_shard", "--optim", "muon"],
            "zero2": ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json")],
            # Muon's momentum is a flat partition like Adam's moments: re-cut by the converter
            "zero2_muon": ["--deepspeed", str(ROOT / "ds_configs" / "zero2.json"), "--optim",
                           "muon"],
            "zero3": ["--deepspeed", str(ROOT / "ds_configs" / "zero3.json")]}


def check_moved(out, printed: str, before: int, after: int) -> None:
    """A run resumed from a `before`-process checkpoint on `after` processes: its world size,
    the recomputed accumulation (printed once), the global batch and token count kept, and
    ranks that read disjoint data."""
    assert world_of(out) == (after, after)
    run_cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    accum = {1: 2, 2: 1}  # 4 sequences per process x accum x processes = 8 either way
    assert run_cfg["training"]["gradient_accumulation_steps"] == accum[after]
    assert run_cfg["global_batch_sequences"] == 8
    assert printed.count(f"--gradient_accumulation_steps {accum[before]} -> "
                         f"{accum[after]}") == 1
    assert printed.count("is dealt to") == 1
    train = [r for r in metrics(out) if "loss" in r]
    assert train[-1]["step"] == STEPS and train[-1]["tokens"] == STEPS * 8 * 32
    end = out / "checkpoints" / f"step-{STEPS}"
    states = [json.loads((end / "state" / f"data_rank{r}.json").read_text())
              for r in range(after)]
    assert [s["world_size"] for s in states] == [after] * after
    if after > 1:  # the ranks read disjoint data: their plans share no shard piece
        items = [set(plan_items(s)) for s in states]
        assert items[0] and items[1] and not items[0] & items[1]


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.slow
def test_resume_on_another_number_of_processes(tmp_path, corpus_dir, tokenizer_dir,
                                               toy_config_dir, backend, capsys):
    """2 processes uninterrupted; the same run from its step-20 checkpoint on 1 process; that
    run from its step-30 checkpoint on 2 processes again. Both end within 1% of the
    uninterrupted run's final held-out loss."""
    extra = BACKENDS[backend]
    kw = dict(max_steps=STEPS, eval_steps=HALF, logging_steps=5, num_samples=1,
              per_device_train_batch_size=4, shuffle_window=32, shuffle_buffer_blocks=16)

    def start(out, nproc, **more):
        args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, **kw, **more) + extra
        if nproc == 1 and not extra:  # in this process: no process group at all
            capsys.readouterr()
            run(args)
            return capsys.readouterr().out
        return torchrun(tmp_path, "train_clm.py", args, nproc)

    full, one, two = tmp_path / "uninterrupted", tmp_path / "on1", tmp_path / "on2"
    start(full, 2, save_steps=HALF, gradient_accumulation_steps=1)
    assert world_of(full) == (2, 2)
    middle = full / "checkpoints" / f"step-{HALF}"
    assert len(list((middle / "state").glob("data_rank*.json"))) == 2
    # the command lines keep the previous run's accumulation: the resume recomputes it
    printed = start(one, 1, save_steps=10, gradient_accumulation_steps=1,
                    resume_from_checkpoint=middle)
    check_moved(one, printed, 2, 1)
    if backend.startswith("zero"):  # converted once into DeepSpeed's universal checkpoint
        assert (middle / "state" / "universal" / "pytorch_model").is_dir()
    if backend == "zero2_muon":  # a Muon matrix's momentum re-cut whole, AdamW's moments too
        params = middle / "state" / "universal" / "pytorch_model" / "zero"
        momentum = torch.load(params / "transformer.h.0.mlp.c_fc.weight" / "momentum_buffer.pt",
                              weights_only=False)["param"]
        assert momentum.shape == (64, 256) and (momentum != 0).float().mean() > 0.99
        assert not (params / "transformer.h.0.mlp.c_fc.weight" / "exp_avg.pt").exists()
        assert (params / "transformer.wte.weight" / "exp_avg_sq.pt").is_file()
    printed = start(two, 2, save_steps=10, gradient_accumulation_steps=2,
                    resume_from_checkpoint=one / "checkpoints" / "step-30")
    check_moved(two, printed, 1, 2)
    a = final_eval(full)
    for moved in (one, two):
        b = final_eval(moved)
        print(f"{backend} {moved.name}: final eval loss {a:.4f} uninterrupted, {b:.4f} "
              f"moved ({(b - a) / a:+.2%})")
        assert abs(b - a) <= 0.01 * a, (moved.name, a, b)


def test_resume_with_other_dataloader_workers(tmp_path, corpus_dir, tokenizer_dir,
                                              toy_config_dir, capsys):
    """Another --dataloader_num_workers is another number of streams: dealt again, in process."""
    kw = dict(max_steps=8, save_steps=4, eval_steps=4, num_samples=0)
    out, moved = tmp_path / "run", tmp_path / "moved"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, dataloader_num_workers=0, **kw))
    capsys.readouterr()
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, moved, dataloader_num_workers=2,
                 resume_from_checkpoint=out / "checkpoints" / "step-4", **kw))
    assert "of 1 stream on 1 process is dealt to 2 streams on 1 process" in capsys.readouterr().out
    state = json.loads((moved / "checkpoints" / "step-8" / "state" / "data_rank0.json")
                       .read_text())
    assert state["num_workers"] == 2 and len(state["workers"]) == 2
    first, second = (set(map(tuple, (i for reader in w["start"]["plan"] for i in reader)))
                     for w in state["workers"])
    assert first and second and not first & second
    train = [r for r in metrics(moved) if "loss" in r]
    assert train[-1]["step"] == 8 and train[-1]["tokens"] == 8 * 4 * 32


@pytest.mark.slow
def test_one_process_checkpoint_continues_on_two(tmp_path, corpus_dir, tokenizer_dir,
                                                 toy_config_dir, capsys):
    """The plain 1 -> 2 case against the uninterrupted 1-process run (DDP)."""
    kw = dict(max_steps=STEPS, eval_steps=HALF, logging_steps=5, num_samples=1,
              per_device_train_batch_size=4, gradient_accumulation_steps=2, shuffle_window=32,
              shuffle_buffer_blocks=16)
    full, moved = tmp_path / "uninterrupted", tmp_path / "on2"
    run(toy_args(corpus_dir, tokenizer_dir, toy_config_dir, full, save_steps=HALF, **kw))
    printed = torchrun(tmp_path, "train_clm.py", toy_args(
        corpus_dir, tokenizer_dir, toy_config_dir, moved, save_steps=STEPS,
        resume_from_checkpoint=full / "checkpoints" / f"step-{HALF}", **kw))
    check_moved(moved, printed, 1, 2)
    a, b = final_eval(full), final_eval(moved)
    print(f"ddp 1 -> 2: final eval loss {a:.4f} uninterrupted, {b:.4f} moved ({(b - a) / a:+.2%})")
    assert abs(b - a) <= 0.01 * a, (a, b)


def test_fit_to_world_keeps_the_global_batch(tmp_path):
    from clm import checkpoint as ckpt, session
    from clm.config import TrainingConfig
    from clm.parallel.launch import Topology

    (tmp_path / "trainer_state.json").write_text(json.dumps(
        {"fingerprint": {"world_size": 2, "global_batch": 16, "block_size": 32}}))
    lines = []

    def fit(world, micro, accum, **kw):
        cfg = TrainingConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=micro,
                             gradient_accumulation_steps=accum)
        session.fit_to_world(tmp_path, cfg, Topology(world_size=world), log=lines.append, **kw)
        return cfg.gradient_accumulation_steps

    assert fit(2, 4, 3) == 3 and not lines, "the same world: the fingerprint check decides"
    assert fit(1, 4, 2) == 4 and "--gradient_accumulation_steps 2 -> 4 keeps its global batch " \
        "of 16 sequences, 512 tokens (4 per process x 4 x 1)" in lines[-1]
    assert fit(4, 2, 2) == 2 and "--gradient_accumulation_steps stays 2" in lines[-1]
    with pytest.raises(ckpt.CheckpointError, match=r"global batch of 16 sequences is not a "
                       r"multiple of --per_device_train_batch_size 3 x 4 processes \(pass "
                       r"--per_device_train_batch_size 1 or 2 or 4\)"):
        fit(4, 3, 1)
    with pytest.raises(ckpt.CheckpointError, match=r"on 3 processes: its global batch of 16 .* "
                       r"\(use a number of processes that divides 16\)"):
        fit(3, 1, 1)
    with pytest.raises(ckpt.CheckpointError, match=r"resume with 2 processes"):
        fit(1, 4, 2, reshardable=False)
