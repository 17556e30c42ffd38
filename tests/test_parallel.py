"""clm/parallel: the launcher's Topology, the one choice of backend, and the interface every
backend fills in (the 2-process runs of each backend are in test_train, test_deepspeed,
test_fsdp and test_reshard)."""

import json

import pytest

from clm.config import TrainingConfig, UsageError
from clm.parallel import BACKENDS, Choice, choose
from clm.parallel.base import Backend
from clm.parallel.launch import Topology
from helpers import ROOT


def test_topology_from_the_launchers_variables():
    one = Topology.from_launcher({})
    assert (one.rank, one.world_size, one.local_rank, one.node, one.num_nodes) == (0, 1, 0, 0, 1)
    assert one.is_main and not one.distributed
    # rank 5 of 8 on two nodes of 4, as torchrun exports it
    t = Topology.from_launcher({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                                "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"})
    assert (t.rank, t.world_size, t.local_rank, t.local_world_size, t.node) == (5, 8, 1, 4, 1)
    assert (t.dp_rank, t.dp_world_size, t.num_nodes) == (5, 8, 2)
    assert not t.is_main and t.distributed
    # without GROUP_RANK the node follows from the rank and the processes per node
    assert Topology.from_launcher({"RANK": "6", "WORLD_SIZE": "8",
                                   "LOCAL_WORLD_SIZE": "4"}).node == 1


def test_a_launch_without_a_process_group_is_refused():
    with pytest.raises(UsageError, match="the launcher started 2 processes but no process group"):
        Topology(rank=0, world_size=2).check_group()
    assert Topology().check_group() == Topology()


def test_the_backend_is_chosen_once_from_options_and_launcher(monkeypatch, tmp_path):
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)
    assert choose(TrainingConfig(output_dir="x"), 1) == Choice("ddp")
    assert choose(TrainingConfig(output_dir="x", fsdp="full_shard"), 2) == Choice("fsdp")
    zero2 = str(ROOT / "ds_configs" / "zero2.json")
    ds = choose(TrainingConfig(output_dir="x", deepspeed=zero2, per_device_train_batch_size=2,
                               gradient_accumulation_steps=3), 4)
    assert ds.name == "deepspeed" and ds.deepspeed_file == zero2
    assert ds.deepspeed_config["train_batch_size"] == 24, "filled from the run's options"
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch exports
    assert choose(TrainingConfig(output_dir="x"), 2).name == "fsdp"
    with pytest.raises(UsageError, match="--fsdp and DeepSpeed both asked for"):
        choose(TrainingConfig(output_dir="x", deepspeed=zero2), 2)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    # refused here, so the run and --dry_run refuse alike, before any work
    for name in ("zero1", "zero2"):  # Muon reads each flat partition back into matrices
        ds_file = str(ROOT / "ds_configs" / f"{name}.json")
        assert choose(TrainingConfig(output_dir="x", deepspeed=ds_file, optim="muon"),
                      2).name == "deepspeed"
    with pytest.raises(UsageError, match=r"--optim muon runs under DeepSpeed ZeRO-1/2 only "
                                         r"\(.*zero3.json has stage 3\): use "):
        choose(TrainingConfig(output_dir="x", deepspeed=str(ROOT / "ds_configs" / "zero3.json"),
                              optim="muon"), 2)
    offload = tmp_path / "zero2_offload.json"
    config = json.loads((ROOT / "ds_configs" / "zero2.json").read_text())
    config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    offload.write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"--optim muon cannot step on the host \(.* offloads "
                                         r"the optimizer\): drop "):
        choose(TrainingConfig(output_dir="x", deepspeed=str(offload), optim="muon"), 2)
    with pytest.raises(UsageError, match="--optim adamw_torch_fused cannot run under FSDP with "
                                         "fp16"):
        choose(TrainingConfig(output_dir="x", fsdp="full_shard", optim="adamw_torch_fused",
                              mixed_precision="fp16"), 2)
    assert choose(TrainingConfig(output_dir="x", fsdp="full_shard", optim="muon"), 2).name == \
        "fsdp"


def test_every_backend_implements_the_whole_interface():
    """Each backend module answers every question the run, the planner and export ask:
    nothing falls through to the interface's NotImplementedError."""
    asked = ("prepare", "micro_batch", "memory_terms", "weights_from_state")
    assert sorted(BACKENDS) == ["ddp", "deepspeed", "fsdp"]
    for name, cls in BACKENDS.items():
        assert cls.name == name and issubclass(cls, Backend)
        for method in asked:
            assert getattr(cls, method) is not getattr(Backend, method), (name, method)
