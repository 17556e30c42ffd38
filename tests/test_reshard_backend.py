"""Training states loaded on a different number of processes than they were saved on
(`backend.load_state(..., saved_world_size=N)`): DeepSpeed ZeRO-1/2/3 through a universal
checkpoint, 2 -> 1 and 1 -> 2 processes; DDP's full states 2 -> 1.

The DeepSpeed runs are three torchrun launches of tests/dist_reshard_check.py, each doing every
ZeRO stage in turn (one engine after another in the same processes, so that the imports are paid
three times rather than twelve): 1 process saves; 2 processes save and load the 1-process
states; 1 process loads the 2-process states. What they recorded is compared here.

Tolerances. Loaded states are compared exactly: the fp32 masters and Adam's fp32 moments are
copied from the saved partitions into the new ones, nothing is computed on them. The step taken
after the load is compared with the step the saving run took from the same state on its own
number of processes, to 1e-6 absolute: the gradients of 2 processes are the two halves' sums
added in another order than 1 process's, a difference of float32 rounding (seen: <= 6e-8 on
weights of ~1e-2 to 1); anything wrong in what was loaded (a lost moment, a wrong step count
in Adam's bias correction, the decay group's weight decay on the biases) moves weights by ~1e-4
at this step's learning rate of 1e-3, as seen while writing this.
"""

import os
import subprocess
import sys

import pytest
import torch

from clm.config import UsageError
from helpers import ROOT

# the module fixture launches 2-process ZeRO runs (about 30 s)
pytestmark = pytest.mark.slow

SCRIPT = ROOT / "tests" / "dist_reshard_check.py"
STAGES = ("zero1", "zero2", "zero3")
CONTINUE_ATOL = 1e-6


def launch(work, processes: int, save: bool, load_from: int, names) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ACCELERATE_") and k not in
           ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(processes), str(SCRIPT), str(work),
                           "save" if save else "nosave", str(load_from), ",".join(names)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def ds_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("reshard")
    launch(work, 1, save=True, load_from=0, names=STAGES)
    launch(work, 2, save=True, load_from=1, names=STAGES)
    launch(work, 1, save=False, load_from=2, names=STAGES)
    return work


def load(path):
    return torch.load(path, weights_only=False)


def assert_same_state(saved: dict, loaded: dict) -> None:
    for key in ("masters", "exp_avg", "exp_avg_sq"):
        assert saved[key].keys() == loaded[key].keys()
        for name, value in saved[key].items():
            assert loaded[key][name].dtype == value.dtype == torch.float32, (key, name)
            torch.testing.assert_close(loaded[key][name], value, rtol=0, atol=0,
                                       msg=f"{key} of {name}")
    assert saved["groups"] == loaded["groups"]  # weight decay per group, betas, eps, lr


def expected_draws(state_dir, rank: int) -> list[float]:
    """torch.rand(4) right after a load on `rank`: from its saved RNG state where it has one,
    else from the seed the backend documents (clm.parallel.base.rank_seed)."""
    from clm.parallel.base import rank_seed

    saved = state_dir / f"random_states_{rank}.pkl"
    generator = torch.Generator()
    if saved.is_file():
        generator.set_state(torch.load(saved, weights_only=False)["torch_manual_seed"])
    else:
        generator.manual_seed(rank_seed(state_dir, rank))
    return torch.rand(4, generator=generator).tolist()


@pytest.mark.parametrize("saved_on, loaded_on", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
@pytest.mark.parametrize("stage", STAGES)
def test_zero_state_loads_on_another_number_of_processes(ds_work, stage, saved_on, loaded_on):
    home = ds_work / stage
    saved = load(home / f"saved_on_{saved_on}" / "saved.pt")
    loaded = load(home / f"loaded_on_{loaded_on}.pt")
    # the launches ran on the numbers of processes they were meant to, as torch.distributed,
    # Accelerate and clm.runtime see them, with the ZeRO stage asked for
    for rec, world in ((saved, saved_on), (loaded, loaded_on)):
        assert rec["torch_world_size"] == rec["accelerate_num_processes"] == \
            rec["runtime_world_size"] == world
        assert rec["backend"] == "deepspeed" and rec["zero_stage"] == int(stage[-1])

    # the state after 2 steps, re-cut into the new partitions: masters and moments exact
    assert_same_state(saved, loaded)
    assert saved["global_steps"] == loaded["global_steps"] == 2
    # one step count per flat fp32 partition (a param group, on this rank: clm.optim's roles
    # embeddings, hidden matrices, norms and biases): every group at 2
    assert saved["steps"] == loaded["steps"] == [2.0, 2.0, 2.0]
    assert [g["role"] for g in loaded["groups"]] == ["embeddings", "hidden_matrices",
                                                     "norms_and_biases"]
    assert [g["weight_decay"] for g in loaded["groups"]] == [0.1, 0.1, 0.0]

    # the same third step as the saving run's own: every group's Adam counts it once
    assert loaded["steps_after"] == [3.0, 3.0, 3.0]
    reference = load(home / f"saved_on_{saved_on}" / "continued.pt")
    assert reference.keys() == loaded["continued"].keys()
    for name, value in reference.items():
        torch.testing.assert_close(loaded["continued"][name], value, rtol=0,
                                   atol=CONTINUE_ATOL, msg=f"after the next step: {name}")

    # converted once into state/universal/ (no temporary folder left); the engine's flag is
    # off again, and its next save is an ordinary checkpoint of the new number of processes
    state = home / f"saved_on_{saved_on}" / "state"
    assert not loaded["universal_existed_before"]
    assert (state / "universal" / "pytorch_model" / "zero" / "optimizer_state.pt").is_file()
    assert loaded["leftovers"] == []
    assert loaded["load_universal_after"] is False
    files = loaded["resaved_files"]
    assert len([f for f in files if f.endswith("optim_states.pt")]) == loaded_on
    assert not any("universal" in f for f in files)

    # RNG: each rank saved then restores its own; a rank that did not exist gets the
    # documented seed (so the two ranks' streams differ)
    draws = loaded["rng_draws"]
    assert len(draws) == loaded_on
    assert draws == [expected_draws(state, r) for r in range(loaded_on)]
    assert len({tuple(d) for d in draws}) == loaded_on


@pytest.mark.parametrize("saved_on, loaded_on", [(2, 1), (1, 2)], ids=["2to1", "1to2"])
def test_universal_folder_is_reused(ds_work, saved_on, loaded_on):
    """A second load (a fresh engine, same processes) reads the folder the first one made."""
    loaded = load(ds_work / STAGES[0] / f"loaded_on_{loaded_on}.pt")
    assert loaded["torch_world_size"] == loaded_on
    again = loaded["again"]
    assert again["universal_inode"] == loaded["universal_inode"]
    saved = load(ds_work / STAGES[0] / f"saved_on_{saved_on}" / "saved.pt")
    for name, value in saved["masters"].items():
        torch.testing.assert_close(again["masters"][name], value, rtol=0, atol=0)


def test_failed_conversion_is_one_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from clm.parallel import deepspeed
    from clm.parallel.launch import Topology

    one = Topology()  # this test's single process
    state = tmp_path / "step-4" / "state"
    (state / "pytorch_model").mkdir(parents=True)
    torch.save({"not": "a zero checkpoint"},
               state / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UsageError) as e:
        deepspeed._universal_checkpoint(state, ["pytorch_model"], saved=2, topology=one)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"could not convert the DeepSpeed checkpoint {state} saved on 2 "
                              "processes for 1 (")
    assert message.endswith("; resume with 2 processes")
    assert sorted(p.name for p in state.iterdir()) == ["pytorch_model"]  # nothing half-made

    (state / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    (state / "pytorch_model").rmdir()
    with pytest.raises(UsageError, match=r"\(no pytorch_model/ folder in it\); resume with 2"):
        deepspeed._universal_checkpoint(state, ["pytorch_model"], saved=2, topology=one)


def test_ddp_state_saved_on_two_processes_loads_on_one(tmp_path):
    import dist_reshard_check as check

    launch(tmp_path, 2, save=True, load_from=0, names=["ddp"])
    home = tmp_path / "ddp" / "saved_on_2"
    saved = load(home / "saved.pt")
    assert saved["backend"] == "ddp"
    assert saved["torch_world_size"] == saved["accelerate_num_processes"] == 2

    cfg, acc, backend, model, opt = check.engine_for("ddp", tmp_path / "loader", 1,
                                                     init_seed=1)
    assert backend.name == "ddp" and acc.num_processes == 1
    assert (backend.topology.rank, backend.topology.world_size) == (0, 1)
    assert not (torch.distributed.is_initialized() and torch.distributed.get_world_size() != 1)
    backend.load_state(model, opt, home / "state", saved_world_size=2)
    loaded = check.record(acc, model, opt)
    assert_same_state(saved, loaded)
    assert saved["steps"] == loaded["steps"] and set(loaded["steps"]) == {2.0}
    assert torch.rand(4).tolist() == expected_draws(home / "state", 0)

    check.train_step(cfg, acc, backend, model, opt, 3)
    reference = load(home / "continued.pt")
    for name, value in reference.items():
        torch.testing.assert_close(check.masters(acc, model)[name], value, rtol=0,
                                   atol=CONTINUE_ATOL, msg=name)
