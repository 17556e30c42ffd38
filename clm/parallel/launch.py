"""What the launcher hands this process: its place among the processes (`Topology`) and the
mixed precision it was started with. The one module that reads either from the environment or
from torch.distributed; everything else is given the `Topology` made here.

    torchrun --standalone --nproc_per_node 2 train_clm.py --config configs/demo_cpu.yaml

`Topology.from_launcher()` reads torchrun's / accelerate's variables, before any process group
exists (the entry points need the world size to fit a resumed batch, and DeepSpeed's JSON needs
it to fill `train_batch_size`); `check_group()` then holds it against the group the accelerator
made, the truth where the two disagree.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

from ..errors import UsageError


@dataclass(frozen=True)
class Topology:
    """This process's place. Training is data-parallel only, so the data-parallel rank and
    world size are the global ones; they are separate fields so that code that deals data or
    divides a batch says which it means, and stays right when a model-parallel axis comes."""

    rank: int = 0                # global rank
    world_size: int = 1          # processes in all
    local_rank: int = 0          # rank on this node (the device index on GPUs)
    local_world_size: int = 1    # processes on this node
    node: int = 0                # this node's index
    restart: int = 0             # torchrun's restarts of the job so far (--max-restarts)
    job: str | None = None       # what names this launch across its restarts (None: no agent)

    @property
    def dp_rank(self) -> int:
        """Which share of the data this process takes."""
        return self.rank

    @property
    def dp_world_size(self) -> int:
        """How many shares the data and the global batch are divided into."""
        return self.world_size

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_launcher(cls, environ=None) -> "Topology":
        """From torchrun's variables (accelerate launch and DeepSpeed's launcher set the same);
        a plain `python` run is one process."""
        env = os.environ if environ is None else environ
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
        node = int(env.get("GROUP_RANK", str(rank // max(1, local_world))))
        return cls(rank, world, int(env.get("LOCAL_RANK", "0")), local_world, node,
                   int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), elastic_job(env))

    def check_group(self) -> "Topology":
        """This topology, after checking it against the process group (if one exists)."""
        d = torch.distributed
        if d.is_available() and d.is_initialized():
            group = (d.get_rank(), d.get_world_size())
            if group != (self.rank, self.world_size):
                raise UsageError(f"the launcher started rank {self.rank} of {self.world_size} "
                                 f"but torch.distributed has rank {group[0]} of {group[1]} "
                                 "(launch with torchrun or accelerate launch, not both)")
        elif self.world_size > 1:
            raise UsageError(f"the launcher started {self.world_size} processes but no process "
                             "group exists (launch with torchrun or accelerate launch)")
        return self


def elastic_job(env) -> str | None:
    """The name torchrun's agent gives this launch, the same in each of its restarts: the
    rendezvous id (`--rdzv_id`, Slurm's job id in scripts/slurm; a fresh one per `--standalone`
    launch). A static rendezvous leaves it 'none'; the agent process, the parent of every
    worker it starts or restarts on one node, names the launch then. None outside an agent."""
    if "TORCHELASTIC_RESTART_COUNT" not in env:
        return None
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return run_id
    return f"{socket.gethostname()}:{os.getppid()}"


def join_restarted_group(topology: Topology, timeout, backend: str) -> bool:
    """On a restart by torchrun's agent, join the process group through keys of this attempt's
    own: the agent serves one TCPStore for all of a launch's attempts (its shared rendezvous
    store, torch 2.4+), and a restarted rank could otherwise read a key that a dead rank of the
    previous attempt wrote there (gloo's peer addresses) and wait for ever to connect to it
    (seen: 1 restart in 3 hung in ProcessGroupGloo's set-up). Returns whether it joined; then
    Accelerate and DeepSpeed find the group made and use it.

    One node only: there the one agent's restart count names the attempt for every rank. Across
    nodes the counts differ (a node restarts healthy ranks without counting when another node
    starts a new round), so the launcher must give each round a store of its own:
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (scripts/slurm/launch.py sets it)."""
    env = os.environ
    d = torch.distributed
    if not (topology.distributed and topology.restart and d.is_available()
            and not d.is_initialized() and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and topology.local_world_size == topology.world_size):
        return False
    agent_store = d.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), topology.world_size,
                             is_master=False, timeout=timeout)
    store = d.PrefixStore(f"clm/attempt_{topology.restart}", agent_store)
    d.init_process_group(backend, store=store, rank=topology.rank,
                         world_size=topology.world_size, timeout=timeout)
    return True


def shared_store_warning(topology: Topology, environ=None) -> str | None:
    """The warning for a multi-node launch that may restart over one shared store (above)."""
    env = os.environ if environ is None else environ
    if (topology.num_nodes > 1 and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
        return ("warning: torchrun --max-restarts across nodes with the agent's shared store: a "
                "restart can hang setting up the process group (stale keys of the failed "
                "attempt); launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set (as "
                "scripts/slurm/launch.py does)")
    return None


def all_reduce_sum(tensor: torch.Tensor, topology: Topology) -> torch.Tensor:
    """Sum `tensor` over the ranks in place (nothing to do on one process)."""
    if topology.distributed:
        torch.distributed.all_reduce(tensor)
    return tensor


def close_distributed() -> None:
    """Leave the process group together before the interpreter exits. Left to interpreter
    shutdown, the group's C++ worker threads can be destroyed while still joinable, and the
    process aborts ("terminate called without an active exception", exit -6) after a run that
    finished and wrote everything."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        d.barrier()
        d.destroy_process_group()


def env_flag(name: str, environ=None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(name, "false").lower() in ("1", "true")


PRECISIONS = ("no", "bf16", "fp16")


def resolve_mixed_precision(given: str | None, environ=None) -> str:
    """The precision a run uses: `--mixed_precision` where given, else the launcher's, else no.

    `accelerate launch --mixed_precision X` (or `mixed_precision: X` in its config file) reaches
    the processes as ACCELERATE_MIXED_PRECISION; passing our own value to `Accelerator` would
    silently override it. The launcher always exports the variable, as "no" when nothing was
    chosen, so its "no" is taken as no choice: only a launcher's bf16/fp16 can contradict
    `--mixed_precision`. A DeepSpeed JSON's bf16/fp16 sections are checked against the result
    (parallel.deepspeed.deepspeed_config), as before.
    """
    env = os.environ if environ is None else environ
    launcher = (env.get("ACCELERATE_MIXED_PRECISION") or "no").lower()
    if given is None:
        if launcher not in PRECISIONS:
            raise UsageError(f"the launcher's mixed precision {launcher} is not supported "
                             "(accelerate launch --mixed_precision bf16, fp16 or no)")
        return launcher
    if launcher != "no" and launcher != given:
        raise UsageError(f"--mixed_precision {given} contradicts the launcher's {launcher} "
                         "(accelerate launch --mixed_precision / the accelerate config): pass "
                         "one of them")
    return given
