"""scripts/slurm: the per-node launcher command rendered from Slurm's variables (a fake 2-node
job, no Slurm needed), the nodelist expansion, and the sbatch script's syntax and wiring."""

import importlib.util
import os
import shlex
import stat
import subprocess
import sys

import pytest

from helpers import ROOT

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
