"""Run under torchrun (1 or 2 processes): training states saved on one number of processes and
loaded on another through the backend (`load_state(..., saved_world_size=N)`).

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/dist_reshard_check.py WORK save|nosave LOAD_FROM zero1,zero2,zero3|ddp

For each config named (a ds_configs/<name>.json, or `ddp` for no DeepSpeed), with `save`: train
the tiny GPT-2 (2 layers, 64 dims) for 2 steps on fixed batches, save its state into
WORK/<name>/saved_on_<world>/state and record the full fp32 masters, Adam moments and step
counts (`saved.pt`, DeepSpeed's gathered from the partitions), take a third step and record the
masters (`continued.pt`). With LOAD_FROM > 0 (DeepSpeed only): load WORK/<name>/saved_on_<LOAD_FROM>
(an earlier launch's) into a freshly and differently initialised engine, record the same, take
the same third step, save again, and write it all to `loaded_on_<world>.pt`. The test compares.

Every launch sees the same global batch (4 rows, rank r taking rows r::world), so runs on 1 and 2
processes take the same steps, up to the order of the gradient reductions.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clm import loop, optim, runtime  # noqa: E402
from clm.parallel.launch import Topology, close_distributed  # noqa: E402
from clm.config import TrainingConfig  # noqa: E402

GLOBAL_ROWS, SEQ, VOCAB = 4, 16, 128
LR = (3e-3, 2e-3, 1e-3)  # the learning rate of steps 1, 2, 3


def dist_info() -> tuple[int, int]:
    """(rank, world size) as torch.distributed has them: what the checks hold the run's against."""
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_initialized() else (0, 1)


def tiny_model(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64,
                                      vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0))


def batch(step: int, rank: int, world: int) -> dict:
    ids = torch.randint(0, VOCAB, (GLOBAL_ROWS, SEQ),
                        generator=torch.Generator().manual_seed(100 + step))
    mine = ids[rank::world]
    return {"input_ids": mine, "labels": mine, "attention_mask": torch.ones_like(mine)}


def reset_accelerate():
    """A new Accelerator (and engine) in this process starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def engine_for(name: str, out: Path, world: int, init_seed: int):
    """(cfg, accelerator, backend, model, optimizer) through runtime.start and the backend's
    prepare, as the training session builds them."""
    reset_accelerate()
    ds = None if name == "ddp" else str(ROOT / "ds_configs" / f"{name}.json")
    cfg = TrainingConfig(output_dir=str(out), deepspeed=ds,
                         per_device_train_batch_size=GLOBAL_ROWS // world,
                         gradient_accumulation_steps=1, max_grad_norm=1.0, weight_decay=0.1,
                         mixed_precision="no", report_to="none")
    backend = runtime.start(cfg, Topology.from_launcher())
    accelerator = backend.accelerator
    model = tiny_model(init_seed)
    make = lambda m: optim.make_optimizer(m, cfg, fused=backend.fused_optimizer())  # noqa: E731
    model, optimizer = backend.prepare(model, make(model), make)
    return cfg, accelerator, backend, model, optimizer


def train_step(cfg, accelerator, backend, model, optimizer, step: int) -> None:
    """Optimizer step `step` (1-based) as the loop takes it: its learning rate, the token-
    normalised backward of this rank's rows, the backend's clip and step."""
    rank, world = dist_info()
    for group in optimizer.param_groups:
        group["lr"] = LR[step - 1]
    sums = loop.forward_backward(model, [batch(step, rank, world)], backend)
    assert backend.clip_and_step(model, optimizer, cfg.max_grad_norm, False, sums).stepped


def record(accelerator, model, optimizer) -> dict:
    """The full fp32 masters, Adam moments and step counts by parameter name, with the
    optimizer's hyperparameters per group (collective under DeepSpeed: every rank calls it)."""
    if hasattr(model, "optimizer"):  # a DeepSpeed engine
        return ds_record(model)
    inner = accelerator.unwrap_model(model)
    names = {id(p): n for n, p in inner.named_parameters()}
    masters = {n: p.detach().clone() for n, p in inner.named_parameters()}
    state = {names[id(p)]: s for p, s in optimizer.optimizer.state.items()}
    return {"masters": masters,
            "exp_avg": {n: s["exp_avg"].clone() for n, s in state.items()},
            "exp_avg_sq": {n: s["exp_avg_sq"].clone() for n, s in state.items()},
            "steps": [float(s["step"]) for s in state.values()],
            "groups": [{k: v for k, v in g.items() if k != "params"}
                       for g in optimizer.param_groups]}


def ds_record(engine) -> dict:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 link each weight to its Adam moments after the first step's first param
        # group, before the second group has any state: the no-decay group's moments are then
        # never linked and safe_get_full_optimizer_state fails for them. Link them all again.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()
    masters, exp_avg, exp_avg_sq = {}, {}, {}
    for name, p in engine.module.named_parameters():
        masters[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
        exp_avg[name] = safe_get_full_optimizer_state(p, "exp_avg").detach().cpu().clone()
        exp_avg_sq[name] = safe_get_full_optimizer_state(p, "exp_avg_sq").detach().cpu().clone()
    base = zero.optimizer  # the torch AdamW over this rank's flat fp32 partitions
    return {"masters": masters, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
            "steps": steps_of(engine), "global_steps": engine.global_steps,
            "groups": [{k: v for k, v in g.items() if k != "params"}
                       for g in base.param_groups]}


def steps_of(engine) -> list[float]:
    """Adam's step count of each of this rank's flat fp32 partitions."""
    return [float(s["step"]) for s in engine.optimizer.optimizer.state.values() if "step" in s]


def masters(accelerator, model) -> dict:
    if hasattr(model, "optimizer"):  # a DeepSpeed engine
        return ds_record(model)["masters"]
    return {n: p.detach().clone() for n, p in accelerator.unwrap_model(model).named_parameters()}


def world_info(backend) -> dict:
    return {"torch_world_size": dist.get_world_size(), "accelerate_num_processes":
            backend.accelerator.num_processes, "runtime_world_size": backend.topology.world_size}


def save_run(work: Path, name: str, world: int) -> None:
    """2 steps, the state, a third step."""
    saved = work / name / f"saved_on_{world}"
    cfg, acc, backend, model, opt = engine_for(name, saved, world, init_seed=0)
    for step in (1, 2):
        train_step(cfg, acc, backend, model, opt, step)
    backend.save_state(model, opt, saved / "state")
    rec = record(acc, model, opt)
    train_step(cfg, acc, backend, model, opt, 3)
    cont = masters(acc, model)
    if dist.get_rank() == 0:
        torch.save({**rec, **world_info(backend), "backend": backend.name,
                    "zero_stage": getattr(backend, "stage", None)}, saved / "saved.pt")
        torch.save(cont, saved / "continued.pt")
    dist.barrier()


def load_run(work: Path, name: str, world: int, load_from: int, again: bool) -> None:
    """Load what `load_from` processes saved into a differently initialised engine, then the
    same third step and a save. `again`: then load it into a second fresh engine (the universal
    folder is there now, so it is reused) and record what that one holds."""
    source = work / name / f"saved_on_{load_from}" / "state"
    universal = source / "universal"
    had_universal = universal.is_dir()
    cfg, acc, backend, model, opt = engine_for(name, work / name / "loader", world, init_seed=1)
    rank = dist.get_rank()  # the engine's process group exists from here on
    backend.load_state(model, opt, source, saved_world_size=load_from)
    draws = [None] * world  # each rank's RNG right after the load
    dist.all_gather_object(draws, torch.rand(4).tolist())
    rec = record(acc, model, opt)
    flag = model._config.load_universal_checkpoint
    train_step(cfg, acc, backend, model, opt, 3)
    cont = masters(acc, model)
    steps_after = steps_of(model)
    # a later save is an ordinary checkpoint of this number of processes again
    resaved = work / name / f"resaved_on_{world}" / "state"
    backend.save_state(model, opt, resaved)
    out = {**rec, **world_info(backend), "backend": backend.name, "zero_stage": backend.stage,
           "rng_draws": draws, "load_universal_after": flag, "continued": cont,
           "steps_after": steps_after, "universal_existed_before": had_universal,
           "universal_inode": universal.stat().st_ino,
           "resaved_files": sorted(p.name for p in (resaved / "pytorch_model").iterdir())}
    if again:
        del model, opt
        cfg, acc, backend, model, opt = engine_for(name, work / name / "loader", world,
                                                   init_seed=2)
        backend.load_state(model, opt, source, saved_world_size=load_from)
        out["again"] = {"masters": record(acc, model, opt)["masters"],
                        "universal_inode": universal.stat().st_ino}
    out["leftovers"] = sorted(p.name for p in source.iterdir() if p.name.startswith("."))
    if rank == 0:
        torch.save(out, work / name / f"loaded_on_{world}.pt")
    dist.barrier()


def main(work: str, save: bool, load_from: int, names: str):
    work = Path(work)
    world = int(os.environ["WORLD_SIZE"])
    for i, name in enumerate(names.split(",")):
        if save:
            save_run(work, name, world)
        if load_from:
            load_run(work, name, world, load_from, again=i == 0)
    close_distributed()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2] == "save", int(sys.argv[3]), sys.argv[4])
