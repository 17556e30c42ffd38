"""scripts/slurm: the per-node launcher command rendered from Slurm's variables (a fake 2-node
job, no Slurm needed), the nodelist expansion, the sbatch script's syntax and wiring, and the
sbatch script run for real as two nodes on this machine (a rank killed, the job restarted on
both nodes, then resumed by a second job that pushes to a local fake Hub)."""

import importlib.util
import json
import os
import socket
import shlex
import stat
import subprocess
import sys

import pytest
import yaml

from fake_hub import FakeHub
from helpers import ROOT, metrics, read_plans, toy_args

_spec = importlib.util.spec_from_file_location("slurm_launch",
                                               ROOT / "scripts" / "slurm" / "launch.py")
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

SBATCH = ROOT / "scripts" / "slurm" / "train_multinode.sbatch"
TRAIN_ARGS = ["--config", "configs/gpt2_124m_owt.yaml", "--run_name", "two nodes, one run",
              "--sample_prompt", "It's \"quoted\" $HOME", "--deepspeed", "ds_configs/zero3.json"]


def job_env(node, **extra):
    """What Slurm sets for a task of a 2-node job, without scontrol on PATH."""
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2",
           "SLURM_NODEID": str(node), "SLURM_PROCID": str(node), "SLURM_JOB_ID": "123456",
           "SCONTROL": "/nonexistent/scontrol"}
    env.update(extra)
    return env


def rendered(env, *options):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "slurm" / "launch.py"),
                           "--print", *options, "--", *TRAIN_ARGS],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout.strip())


def option(cmd, name):
    return cmd[cmd.index(name) + 1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-02]", ["gpu01", "gpu02"]),
    ("gpu01", ["gpu01"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[1-2]-ib[0-1]", ["a1-ib0", "a1-ib1", "a2-ib0", "a2-ib1"]),
    ("x1,y[3,5]", ["x1", "y3", "y5"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert launch.expand_nodelist(nodelist) == hosts


def test_two_nodes_render_the_same_rendezvous_and_their_own_rank():
    cmds = [rendered(job_env(node)) for node in (0, 1)]
    for node, cmd in enumerate(cmds):
        assert os.path.basename(cmd[0]) == "torchrun"
        assert option(cmd, "--nnodes") == "2" and option(cmd, "--nproc_per_node") == "8"
        assert option(cmd, "--rdzv_backend") == "c10d"
        assert option(cmd, "--rdzv_endpoint") == "gpu01:29956"  # 29500 + job id % 1000
        assert option(cmd, "--rdzv_id") == "123456"
        assert option(cmd, "--rdzv_conf") == f"is_host={int(node == 0)}"
        i = cmd.index("train_clm.py")
        assert cmd[i + 1:] == TRAIN_ARGS, "the training arguments pass through unchanged"
    strip = lambda c: [x for x in c if not x.startswith("is_host")]  # noqa: E731
    assert strip(cmds[0]) == strip(cmds[1]), "only the node's rank differs"


def test_master_addr_port_and_gpus_from_the_environment(tmp_path):
    cmd = rendered(job_env(1, MASTER_ADDR="10.1.2.3", MASTER_PORT="31000", GPUS_PER_NODE="4"))
    assert option(cmd, "--rdzv_endpoint") == "10.1.2.3:31000"
    assert option(cmd, "--nproc_per_node") == "4"
    # scontrol, where there is one, names the first node
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] && printf 'nodeA\\nnodeB\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    cmd = rendered(job_env(0, SCONTROL=str(fake)))
    assert option(cmd, "--rdzv_endpoint").startswith("nodeA:")


def test_accelerate_launch_variant():
    cmds = [rendered(job_env(node), "--launcher", "accelerate", "--accelerate_config",
                     "accelerate_configs/deepspeed_zero3.yaml") for node in (0, 1)]
    for node, cmd in enumerate(cmds):
        assert os.path.basename(cmd[0]) == "accelerate" and cmd[1] == "launch"
        assert option(cmd, "--config_file") == "accelerate_configs/deepspeed_zero3.yaml"
        assert option(cmd, "--num_machines") == "2" and option(cmd, "--num_processes") == "16"
        assert option(cmd, "--machine_rank") == str(node)
        assert option(cmd, "--main_process_ip") == "gpu01"
        assert cmd[cmd.index("train_clm.py") + 1:] == TRAIN_ARGS
    assert (ROOT / "accelerate_configs" / "multi_node.yaml").is_file()


def test_missing_slurm_variables_are_one_line_errors():
    env = job_env(0)
    del env["SLURM_NNODES"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "slurm" / "launch.py"),
                           "--print", "--", "--config", "x.yaml"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: SLURM_NNODES is not set (run under srun in an sbatch or salloc job)"]
    with pytest.raises(launch.LaunchError, match="outside the job's 2 nodes"):
        launch.render(job_env(2), [])


def test_sbatch_script_syntax_directives_and_wiring(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    text = SBATCH.read_text()
    for directive in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node=8", "--signal="):
        assert f"#SBATCH {directive}" in text, directive
    # run the batch script itself with stand-ins for srun (one task per node) and scontrol
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"  # srun's own options
        "for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n SLURM_PROCID=$n \"$@\"; done\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = job_env(0, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=sys.executable, DRY="1")
    del env["SCONTROL"], env["SLURM_NODEID"], env["SLURM_PROCID"]
    proc = subprocess.run(["bash", str(SBATCH), *TRAIN_ARGS], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "job 123456: 2 nodes x 8 GPUs, rendezvous gpu01:29956"
    cmds = [shlex.split(line) for line in lines[1:]]
    assert [option(c, "--rdzv_conf") for c in cmds] == ["is_host=1", "is_host=0"]
    for cmd in cmds:
        assert option(cmd, "--rdzv_endpoint") == "gpu01:29956"
        assert cmd[cmd.index("train_clm.py") + 1:] == TRAIN_ARGS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_node_job(tmp_path, job_id, train_args, **env_extra):
    """The sbatch script on this machine as a 2-node job, one process per node: a stand-in srun
    starts each node's task at once, with its own node-local temporary folder and log."""
    bin_dir, nodes = tmp_path / "bin", tmp_path / f"nodes-{job_id}"
    bin_dir.mkdir(exist_ok=True)
    nodes.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf '127.0.0.1\\n127.0.0.1\\n'\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "while [[ $1 == --* ]]; do shift; done\n"
        "pids=()\n"
        "for ((n = 0; n < SLURM_NNODES; n++)); do\n"
        "  mkdir -p \"$NODES/$n/tmp\"\n"
        "  SLURM_NODEID=$n SLURM_PROCID=$n TMPDIR=$NODES/$n/tmp \"$@\" > \"$NODES/$n/log\" 2>&1 &\n"
        "  pids+=($!)\n"
        "done\n"
        "rc=0; for p in \"${pids[@]}\"; do wait $p || rc=$?; done; exit $rc\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, **job_env(0), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTHON": sys.executable, "NODES": str(nodes), "SLURM_JOB_NODELIST": "node[0-1]",
           "SLURM_JOB_ID": str(job_id), "GPUS_PER_NODE": "1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1", "CLM_FAULTS": "", **env_extra}
    for name in ("SCONTROL", "SLURM_NODEID", "SLURM_PROCID", "MASTER_ADDR"):
        env.pop(name, None)
    proc = subprocess.run(["bash", str(SBATCH), *map(str, train_args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    logs = [(nodes / str(n) / "log").read_text() for n in range(2)]
    return proc, logs, [nodes / str(n) / "tmp" for n in range(2)]


@pytest.mark.slow
def test_two_nodes_on_one_machine_restart_resume_and_write_once(tmp_path, corpus_dir,
                                                              tokenizer_dir, toy_config_dir):
    out = tmp_path / "shared" / "run"  # the one folder both nodes see
    args = toy_args(corpus_dir, tokenizer_dir, toy_config_dir, out, max_steps=6, save_steps=3,
                    eval_steps=3, num_samples=1)
    # job 1: rank 1 (node 1) is killed after step 4; both nodes' agents restart the job, which
    # goes on from step-3 by itself
    proc, logs, tmps = two_node_job(tmp_path, 4101, args, MAX_RESTARTS="1",
                                    CLM_FAULTS="kill:rank=1,step=4")
    assert proc.returncode == 0, proc.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
    assert proc.stdout.startswith("job 4101: 2 nodes x 1 GPUs, rendezvous 127.0.0.1:")
    both = logs[0] + logs[1]
    # global duties, once per job (rank 0, on whichever node the restart's rendezvous put it):
    # the report, the checkpoints' model folders, the final folder and card
    restart = ("a restart of this launch (torchrun --max-restarts, run id 4101): resuming from "
               f"{out / 'checkpoints' / 'step-3'}")
    assert both.count(restart) == 1, both[-3000:]
    assert both.count("final eval loss") == 1
    run_cfg = yaml.safe_load((out / "run_config.yaml").read_text())
    assert run_cfg["world_size"] == 2
    assert run_cfg["distributed"]["torch_world_size"] == 2
    assert run_cfg["distributed"]["nodes"] == 2
    # job 2, a new launch: resumed with a flag, extended to step 8, pushed to the Hub once
    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.endpoint, "HF_TOKEN": "hf_two_nodes", "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_OFFLINE": "0"}
        more = ["--resume_from_checkpoint", "latest", "--max_steps", "8", "--push_to_hub",
                "true", "--hub_model_id", "me/two-nodes", "--hub_strategy", "end"]
        proc, logs, tmps2 = two_node_job(tmp_path, 4102, args + more, **env)
        assert proc.returncode == 0, proc.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
        pushes = [(c["revision"], c["message"]) for c in hub.commits]
    both = logs[0] + logs[1]
    assert both.count(f"resumed from {out / 'checkpoints' / 'step-6'} at step 6") == 1
    assert both.count("final eval loss") == 1
    assert pushes == [("main", "final model at step 8")], pushes
    # every step trained once, in order, across the restart and the resume
    steps = [r["step"] for r in metrics(out) if "loss" in r]
    assert steps == list(range(1, 9)), steps
    # each checkpoint holds both ranks' data states; the ranks read disjoint data
    states = [json.loads((out / "checkpoints" / "step-6" / "state" /
                          f"data_rank{r}.json").read_text()) for r in range(2)]
    assert [s["rank"] for s in states] == [0, 1] and {s["world_size"] for s in states} == {2}
    plans = read_plans(corpus_dir, states)
    assert plans[0] and plans[1] and not plans[0] & plans[1]
    # nothing of the run was left in a node's own temporary folder
    for tmp in tmps + tmps2:
        assert not list(tmp.rglob("*.safetensors")) and not list(tmp.rglob("metrics.jsonl"))
