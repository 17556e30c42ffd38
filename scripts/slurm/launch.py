"""Start this node's share of a multi-node run under Slurm: the launcher command built from the
job's variables, run (or printed) on each node. train_multinode.sbatch runs it once per node.

    srun --ntasks-per-node 1 .venv/bin/python scripts/slurm/launch.py -- --config configs/gpt2_124m_owt.yaml
    SLURM_JOB_NODELIST='gpu[01-02]' SLURM_NNODES=2 SLURM_NODEID=1 SLURM_JOB_ID=42 \\
        python scripts/slurm/launch.py --print -- --config configs/gpt2_124m_owt.yaml   # show node 1's

Every node renders the same rendezvous (the job's first node, a port, the job id as rendezvous
id), so the torchrun agents find each other whatever order they start in; torchrun's c10d
rendezvous then numbers the processes. The first node hosts the rendezvous store (is_host=1
there), so nothing depends on matching hostnames. Everything after `--` goes to the training
script unchanged: it is passed as argv, never through a shell. Only the standard library is
used, so this starts in milliseconds on every node.

The first node is MASTER_ADDR where set (the sbatch script sets it from `scontrol show
hostnames`), else the first line of `scontrol show hostnames $SLURM_JOB_NODELIST`, else this
file's own expansion of the nodelist (for machines without scontrol, and the tests).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_PORT = 29500


class LaunchError(ValueError):
    """A missing or bad Slurm variable: one line on stderr, exit code 2."""


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas that are not inside brackets: "a[1-2,4],b" -> ["a[1-2,4]", "b"]."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    items.append(nodelist[start:])
    return [item for item in (x.strip() for x in items) if item]


def _expand_one(host: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", host)
    if not match:
        return [host]
    prefix, rest = host[:match.start()], host[match.end():]
    values = []
    for part in match.group(1).split(","):
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise LaunchError(f"cannot expand range [{part}] in nodelist '{host}'")
            values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        else:
            values.append(part)
    return [prefix + v + tail for v in values for tail in _expand_one(rest)]


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list as `scontrol show hostnames` prints it, in order:
    "gpu[01-03,07],login1" -> gpu01 gpu02 gpu03 gpu07 login1 (zero padding kept)."""
    hosts = [h for item in _split_top_level(nodelist) for h in _expand_one(item)]
    if not hosts:
        raise LaunchError(f"empty nodelist '{nodelist}'")
    return hosts


def first_node(env) -> str:
    if env.get("MASTER_ADDR"):
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is not set (run under srun in an sbatch or salloc "
                          "job, or set MASTER_ADDR)")
    scontrol = shutil.which(env.get("SCONTROL", "scontrol"), path=env.get("PATH"))
    if scontrol:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=False)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    return expand_nodelist(nodelist)[0]


def _int_env(env, *names: str, default: int | None = None) -> int:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(str(value).split("(")[0])  # SLURM_*: "8" or "8(x2)"
            except ValueError:
                raise LaunchError(f"{name}={value} is not a whole number") from None
    if default is not None:
        return default
    raise LaunchError(f"{names[0]} is not set (run under srun in an sbatch or salloc job)")


def render(env, train_args: list[str], launcher: str = "torchrun",
           script: str = "train_clm.py",
           accelerate_config: str = "accelerate_configs/multi_node.yaml") -> list[str]:
    """The command this node runs, as argv."""
    nnodes = _int_env(env, "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
    node_rank = _int_env(env, "SLURM_NODEID", "SLURM_PROCID")
    job_id = _int_env(env, "SLURM_JOB_ID")
    gpus = _int_env(env, "GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", default=8)
    # a port of its own per job, so that two jobs sharing a node do not meet on one rendezvous
    port = _int_env(env, "MASTER_PORT", default=DEFAULT_PORT + job_id % 1000)
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"node rank {node_rank} is outside the job's {nnodes} nodes")
    host = first_node(env)
    restarts = _int_env(env, "MAX_RESTARTS", default=0)
    if launcher == "torchrun":
        # a rank that dies restarts the job on every node (each agent sees the new round), and
        # the restart resumes from the newest checkpoint by itself (clm.session.check_output)
        return [_tool("torchrun"), "--nnodes", str(nnodes), "--nproc_per_node", str(gpus),
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{host}:{port}",
                "--rdzv_id", str(job_id), "--rdzv_conf", f"is_host={int(node_rank == 0)}",
                "--max-restarts", str(restarts), script, *train_args]
    if launcher == "accelerate":
        # accelerate's static rendezvous: the machine rank decides the process ranks
        return [_tool("accelerate"), "launch", "--config_file", accelerate_config,
                "--num_machines", str(nnodes), "--num_processes", str(nnodes * gpus),
                "--machine_rank", str(node_rank), "--main_process_ip", host,
                "--main_process_port", str(port), "--max_restarts", str(restarts), script,
                *train_args]
    raise LaunchError(f"unknown launcher '{launcher}' (choose torchrun or accelerate)")


def _tool(name: str) -> str:
    """The launcher next to this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else name


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--print", action="store_true",
                   help="Print the command instead of running it (also with DRY=1).")
    p.add_argument("--launcher", choices=["torchrun", "accelerate"],
                   default=os.environ.get("LAUNCHER", "torchrun"))
    p.add_argument("--script", default=os.environ.get("TRAIN_SCRIPT", "train_clm.py"),
                   help="Entry point to launch (train_clm.py, finetune/run_sft.py).")
    p.add_argument("--accelerate_config",
                   default=os.environ.get("ACCELERATE_CONFIG",
                                          "accelerate_configs/multi_node.yaml"),
                   help="With --launcher accelerate: the config file (its num_machines, "
                        "machine_rank, main_process_ip and port are overridden from Slurm).")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="-- then the training script's options, passed unchanged.")
    args = p.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    try:
        cmd = render(os.environ, train_args, args.launcher, args.script, args.accelerate_config)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print or os.environ.get("DRY", "0") not in ("", "0"):
        print(shlex.join(cmd), flush=True)
        return 0
    node = os.environ.get("SLURM_NODEID", os.environ.get("SLURM_PROCID"))
    print(f"[node {node}] {shlex.join(cmd)}", file=sys.stderr, flush=True)
    # each rendezvous round gets a store of its own: a restart over the agent's shared one can
    # hang on the failed attempt's keys (clm.parallel.launch.join_restarted_group)
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    os.execvp(cmd[0], cmd)  # the launcher takes this process's place: Slurm's signals reach it
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
