"""Tests of the multi-node launch routes (docs/cluster.md): launch/slurm/distill.sbatch with the per-node
launcher and batch-step supervisor in flexkd_ds.runtime.launcher, and the plain ``deepspeed --hostfile`` route.

SLURM is faked by small executables in tests/fake_slurm put first on PATH: ``srun`` starts the per-node command
once per "node" as processes on this machine (SLURM_NODEID=0, 1), forwards signals to them and kills the step
when a task fails (--kill-on-bad-exit); ``scontrol`` expands comma node lists and records ``requeue``. The
default suite checks the scripts parse, the rank mapping against a written-out expectation, the documented
hostfile against DeepSpeed's own parser, and the signal / requeue / failure paths with stand-in ranks
(tests/fake_slurm/rank_probe.py, no torch; seconds). The ``slow`` tests run the real tiny recipe on 2 "nodes"
x 2 CPU ranks (about 2 minutes per launch on 2 loaded cores).
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import RECIPE, REPO, free_port, job_env, kill_tree, read_metrics

from flexkd_ds.runtime import launcher
from flexkd_ds.runtime.launcher import (
    LaunchError,
    NodeLayout,
    gpus_per_node,
    port_for_job,
    script_args,
    slurm_layout,
)

SLURM_DIR = REPO / "launch" / "slurm"
SBATCH = SLURM_DIR / "distill.sbatch"
HOSTFILE = REPO / "launch" / "hostfile.example"
FAKE_SLURM = REPO / "tests" / "fake_slurm"
PROBE = "tests/fake_slurm/rank_probe.py"
NODELIST = "localhost,127.0.0.1"  # two "nodes", both this machine; the first is the master
JOB_TIMEOUT = 420  # one 4-rank launch of the tiny recipe on 2 loaded cores takes about 2 minutes


# -------------------------------------------------------------------------------------- fake SLURM harness


def slurm_env(tmp_path: Path, job_id: int, **extra: str) -> dict[str, str]:
    """The environment sbatch would give the batch step (2 nodes x 2 "GPUs"), with fake srun/scontrol."""
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_")}
    env.update(
        PATH=os.pathsep.join([str(FAKE_SLURM), str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHON=sys.executable,
        FAKE_SLURM_LOG=str(tmp_path / "slurm.log"),
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NAME="flexkd",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST=NODELIST,
        SLURM_GPUS_ON_NODE="2",
        SLURM_SUBMIT_DIR=str(REPO),
    )
    env.update(extra)
    return env


class BatchJob:
    """``bash distill.sbatch args`` as the batch step, output in ``log`` (logs/%x-%j.out on a cluster)."""

    def __init__(self, env: dict[str, str], args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.offset = out.tell()
            self.proc = subprocess.Popen(
                ["bash", str(SBATCH), *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def output(self) -> str:
        with open(self.log, "rb") as out:
            out.seek(self.offset)
            return out.read().decode(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()
            raise AssertionError(f"batch job timed out after {timeout} s:\n{self.output()[-6000:]}") from None

    def fail(self, what: str) -> AssertionError:
        return AssertionError(f"{what} (exit {self.proc.returncode}):\n{self.output()[-6000:]}")


def wait_for(predicate, timeout: float, job: BatchJob, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job.proc.poll() is not None or time.monotonic() > deadline:
            kill_tree(job.proc.pid)
            job.proc.wait()
            raise job.fail(f"gave up waiting for {what}")
        time.sleep(0.2)


def probe_records(probe_dir: Path) -> dict[int, dict]:
    return {int(p.stem[4:]): json.loads(p.read_text()) for p in probe_dir.glob("rank*.json")}


def slurm_calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "slurm.log"
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------------------------- scripts and files


def test_slurm_scripts_parse_with_bash_n():
    scripts = sorted(p for p in SLURM_DIR.iterdir() if p.is_file())
    assert SBATCH in scripts
    for script in scripts:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"bash -n {script}: {result.stderr}"


def test_sbatch_asks_for_one_launcher_per_node_logs_requeue_and_early_signal():
    lines = SBATCH.read_text().splitlines()
    directives = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH ")]
    assert "--ntasks-per-node=1" in directives
    assert "--requeue" in directives
    assert "--output=logs/%x-%j.out" in directives
    early = [d for d in directives if d.startswith("--signal=")]
    assert len(early) == 1 and early[0].startswith("--signal=B:USR1@"), early
    assert int(early[0].rsplit("@", 1)[1]) >= 60  # time for a step and a checkpoint before the limit
    body = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    assert "srun --kill-on-bad-exit=1" in body and "flexkd_ds.launcher supervise" in body


def test_hostfile_example_and_its_commands_parse_with_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile
    from deepspeed.launcher.runner import parse_args as runner_args

    assert dict(fetch_hostfile(str(HOSTFILE))) == {"node1": 8, "node2": 8}
    # The commands documented in its comments, joined across their continuation lines.
    text = "\n".join(line[1:].strip() for line in HOSTFILE.read_text().splitlines() if line.startswith("#"))
    commands = [c for c in text.replace("\\\n", " ").splitlines() if c.startswith("deepspeed ")]
    assert len(commands) == 2, commands
    for command in commands:
        args = runner_args(shlex.split(command)[1:])
        assert args.hostfile == "hostfile" and args.master_addr == "node1" and args.master_port == 29500
        assert args.user_script == "launch/distill.py"
    assert runner_args(shlex.split(commands[1])[1:]).no_ssh


# --------------------------------------------------------------------------------------- layout (pure)


def test_rank_mapping_three_nodes_four_gpus():
    hosts = ["gpu07", "gpu08", "gpu11"]
    env = {"SLURM_NNODES": "3", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "4242"}
    seen = []
    for node in range(3):
        layout = slurm_layout({**env, "SLURM_NODEID": str(node)}, hosts)
        for local in range(4):
            rank_env = layout.rank_env(local)
            seen.append(int(rank_env["RANK"]))
            assert rank_env == {
                "RANK": str(4 * node + local), "LOCAL_RANK": str(local), "WORLD_SIZE": "12", "LOCAL_SIZE": "4",
                "MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 4242), "CROSS_RANK": str(node),
                "CROSS_SIZE": "3",
            }  # fmt: skip
    assert sorted(seen) == list(range(12))
    chosen = slurm_layout(
        {**env, "SLURM_NODEID": "2", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}, hosts
    )
    assert (chosen.master_addr, chosen.master_port, chosen.global_rank(3)) == ("10.0.0.7", 29500, 11)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"SLURM_GPUS_ON_NODE": "4", "SLURM_GPUS_PER_NODE": "8"}, 4),
        ({"SLURM_GPUS_PER_NODE": "8"}, 8),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, 4),
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:2"}, 2),
        ({"CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
        ({}, None),
    ],
)
def test_gpus_per_node_from_slurm_variables(environ, expected):
    assert gpus_per_node(environ) == expected


def test_port_for_job_is_stable_and_below_the_ephemeral_range():
    assert port_for_job("123456") == 15000 + 123456 % 15000 == port_for_job(123456)
    assert port_for_job("1234_7") == 15000 + 12347 % 15000  # array job ids
    ports = {port_for_job(i) for i in range(1000, 1100)}
    assert len(ports) == 100 and all(15000 <= p < 30000 for p in ports)


@pytest.mark.parametrize(
    "environ, hosts, needle",
    [
        ({"SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "2"}, ["a", "b"], "SLURM_NODEID"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "2"}, ["a"], "SLURM_NNODES=2"),
        ({"SLURM_NNODES": "2", "SLURM_NODEID": "2", "SLURM_GPUS_ON_NODE": "2"}, ["a", "b"], "SLURM_NODEID=2"),
        ({"SLURM_NNODES": "1", "SLURM_NODEID": "0"}, ["a"], "--procs-per-node"),
        ({"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "1", "MASTER_PORT": "x"}, ["a"],
         "MASTER_PORT"),
        ({"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "1"}, ["a"], "SLURM_JOB_ID"),
    ],
)  # fmt: skip
def test_layout_errors_name_the_variable(environ, hosts, needle):
    with pytest.raises(LaunchError, match=needle.replace("-", r"\-")):
        slurm_layout(environ, hosts)


def test_script_args_order_and_job_selection():
    job, args = script_args(["train.lr=1", "x=2"], "distill", "r.yaml", "/o", "a=1 'b=c d'")
    assert job == "distill" and args == [
        "--config",
        "r.yaml",
        "output_dir=/o",
        "a=1",
        "b=c d",
        "train.lr=1",
        "x=2",
    ]
    job, args = script_args(["score", "--compare", "f"], "distill", "", "", "")
    assert job == "score" and args == ["--compare", "f"]
    with pytest.raises(LaunchError, match="expected one of distill"):
        launcher.job_command("train", [], REPO)
    assert launcher.job_command("distill", ["a"], REPO) == [str(REPO / "launch" / "distill.py"), "a"]
    assert NodeLayout(("h",), 0, 2, 1).world_size == 2


# ------------------------------------------------------------ fake SLURM, stand-in ranks (default suite)


def start_probe_job(tmp_path: Path, job_id: int, **extra: str) -> BatchJob:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    env = slurm_env(tmp_path, job_id, PROBE_DIR=str(probe_dir), CONFIG="cfg.yaml", OUTPUT_DIR="/o",
                    OVERRIDES="a=1 'b=x y'", **extra)  # fmt: skip
    return BatchJob(env, [PROBE, "c=3"], tmp_path / "batch.log")


def test_fake_slurm_maps_ranks_forwards_usr1_and_requeues(tmp_path):
    job = start_probe_job(tmp_path, 31337)
    wait_for(lambda: len(probe_records(tmp_path / "probe")) == 4, 60, job, "4 ranks")
    job.proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@T does: the batch step only
    if job.wait(60) != 0:
        raise job.fail("the preempted job should exit 0")
    records = probe_records(tmp_path / "probe")
    for rank, record in records.items():
        node, local = divmod(rank, 2)
        assert record["signals"] == ["SIGUSR1"], (rank, record)
        assert record["argv"] == ["--config", "cfg.yaml", "output_dir=/o", "a=1", "b=x y", "c=3"]
        assert record["env"] == {
            "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
            "MASTER_ADDR": "localhost", "MASTER_PORT": str(15000 + 31337 % 15000), "CROSS_RANK": str(node),
            "CROSS_SIZE": "2", "SLURM_NODEID": str(node), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
    calls = slurm_calls(tmp_path)
    assert calls[-1] == "scontrol requeue 31337", calls
    assert any(c.startswith("srun --kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=1") for c in calls), calls


def test_fake_slurm_sigterm_is_forwarded_without_requeue(tmp_path):
    job = start_probe_job(tmp_path, 4100)
    wait_for(lambda: len(probe_records(tmp_path / "probe")) == 4, 60, job, "4 ranks")
    job.proc.send_signal(signal.SIGTERM)  # scancel: stop, no requeue
    if job.wait(60) != 0:
        raise job.fail("ranks that handle SIGTERM and exit 0 should give exit 0")
    assert all(r["signals"] == ["SIGTERM"] for r in probe_records(tmp_path / "probe").values())
    assert not any("requeue" in c for c in slurm_calls(tmp_path))


def test_fake_slurm_failed_rank_stops_every_node_without_requeue(tmp_path):
    job = start_probe_job(tmp_path, 4200, PROBE_FAIL_RANK="2")
    start = time.monotonic()
    code = job.wait(60)
    assert code == 3, job.fail("rank 2 exits 3: the job must exit 3")
    assert time.monotonic() - start < 40  # not hanging on the ranks still waiting for a signal
    assert "rank 2 exited with status 3" in job.output()
    assert not any("requeue" in c for c in slurm_calls(tmp_path))


def test_dry_run_under_srun_prints_each_nodes_layout_and_command(tmp_path):
    """The check docs/cluster.md suggests before a real run."""
    cmd = ["srun", "--nodes=2", "--ntasks-per-node=1", sys.executable, "-m", "flexkd_ds.launcher", "node",
           "--dry-run", "--", "distill", "--config", "launch/recipes/tiny.yaml"]  # fmt: skip
    env = slurm_env(tmp_path, 5000, MASTER_PORT="29500")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for node, host in enumerate(NODELIST.split(",")):
        layout = f"node {node} of 2 ({host}): ranks {2 * node}-{2 * node + 1} of 4, master localhost:29500"
        assert layout in lines, lines
    assert lines.count(shlex.join([sys.executable, "-u", "launch/distill.py", "--config",
                                   "launch/recipes/tiny.yaml"])) == 2, lines  # fmt: skip
    assert not (tmp_path / "probe").exists()


def test_sbatch_outside_slurm_and_bad_job_fail_clearly(tmp_path):
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_")}
    result = subprocess.run(["bash", str(SBATCH)], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "submit this script with sbatch" in result.stderr
    job = BatchJob(slurm_env(tmp_path, 4300, JOB="train"), [], tmp_path / "batch.log")
    assert job.wait(60) == 2
    assert "job 'train': expected one of distill, score, prune, evaluate, plan" in job.output()


# --------------------------------------------------------------------- real tiny-recipe launches (slow)


def tiny_overrides(out: Path, *extra: str) -> dict[str, str]:
    return {"CONFIG": str(RECIPE), "OUTPUT_DIR": str(out), "OVERRIDES": " ".join(extra)}


def check_four_rank_checkpoint(out: Path, step: int) -> None:
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{step:08d}", tag
    ranks = sorted(p.name for p in (out / "checkpoints" / tag).glob("flexkd_rank*.pt"))
    assert ranks == [f"flexkd_rank{r}.pt" for r in range(4)], ranks  # 4 ranks took part


def check_student(out: Path) -> None:
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["hidden_size"] == 32 and (out / "student" / "model.safetensors").is_file()


@pytest.mark.slow
def test_fake_slurm_two_nodes_run_tiny_recipe_to_the_end(tmp_path):
    out = tmp_path / "out"
    env = slurm_env(tmp_path, random.randint(10**5, 10**6), MASTER_PORT=str(free_port()),
                    **tiny_overrides(out, "train.max_steps=3"))  # fmt: skip
    job = BatchJob(env, [], tmp_path / "batch.log")
    if job.wait(JOB_TIMEOUT) != 0:
        raise job.fail("the tiny recipe on 2 fake nodes failed")
    assert [m["step"] for m in read_metrics(out)] == [1, 2, 3]
    check_four_rank_checkpoint(out, 3)
    check_student(out)
    assert "node 1 of 2 (127.0.0.1): ranks 2-3 of 4" in job.output()
    assert not any("requeue" in c for c in slurm_calls(tmp_path))


@pytest.mark.slow
def test_fake_slurm_usr1_checkpoints_requeues_and_resumes(tmp_path):
    out, job_id, port = tmp_path / "out", random.randint(10**5, 10**6), str(free_port())
    env = slurm_env(tmp_path, job_id, MASTER_PORT=port, **tiny_overrides(out, "train.max_steps=500"))
    job = BatchJob(env, [], tmp_path / "batch.log")
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, JOB_TIMEOUT, job, "step 1")
    job.proc.send_signal(signal.SIGUSR1)
    if job.wait(JOB_TIMEOUT) != 0:
        raise job.fail("the preempted job should exit 0")
    stopped = read_metrics(out)[-1]["step"]
    assert 1 <= stopped < 500 and "preemption signal: checkpointing" in job.output()
    print(f"preempted at step {stopped}")  # shown with pytest -s
    check_four_rank_checkpoint(out, stopped)
    assert slurm_calls(tmp_path)[-1] == f"scontrol requeue {job_id}"
    assert not (out / "student").exists()

    # The requeued job: same id, same environment (a shorter max_steps keeps the test short).
    env.update(SLURM_RESTART_COUNT="1", OVERRIDES=f"train.max_steps={stopped + 2}")
    again = BatchJob(env, [], tmp_path / "batch.log")
    if again.wait(JOB_TIMEOUT) != 0:
        raise again.fail("the requeued job failed")
    assert f"at step {stopped}" in again.output() and "resumed from" in again.output()
    assert [m["step"] for m in read_metrics(out)] == [*range(1, stopped + 1), stopped + 1, stopped + 2]
    check_four_rank_checkpoint(out, stopped + 2)
    check_student(out)


@pytest.mark.slow
def test_plain_deepspeed_hostfile_no_ssh_two_node_ranks(tmp_path):
    """The documented --no_ssh route: the same deepspeed command on each "node" with its --node_rank."""
    out, port = tmp_path / "out", str(free_port())
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=2\nnode2 slots=2\n")  # names are only keys with --no_ssh
    procs = []
    for node_rank in range(2):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
               "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", port,
               "launch/distill.py", "--config", str(RECIPE), f"output_dir={out}", "train.max_steps=2"]  # fmt: skip
        log = open(tmp_path / f"node{node_rank}.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))  # fmt: skip
    try:
        codes = [p.wait(timeout=JOB_TIMEOUT) for p in procs]
    finally:
        for p in procs:
            kill_tree(p.pid)
    logs = [(tmp_path / f"node{r}.log").read_text(errors="replace")[-4000:] for r in range(2)]
    assert codes == [0, 0], logs
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    check_four_rank_checkpoint(out, 2)
    check_student(out)
