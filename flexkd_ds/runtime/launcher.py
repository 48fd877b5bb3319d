"""Multi-node launch under SLURM: a per-node launcher that starts this node's ranks, and a batch-step supervisor
that turns SLURM's early-warning signal into checkpoint -> exit -> ``scontrol requeue``.

``launch/slurm/distill.sbatch`` only wraps these two commands (see docs/cluster.md):

  python -m flexkd_ds.launcher supervise -- srun --kill-on-bad-exit=1 ... \\
      python -m flexkd_ds.launcher node --job distill --config C --output-dir D -- key=value ...

Why not ``deepspeed.launcher.launch`` as the per-node launcher: it does not read SLURM's variables, it has no
SIGUSR1 handler (SIGUSR1 kills it and leaves its ranks running, orphaned and never signalled: measured with
DeepSpeed 0.19.8), and on SIGTERM it gives its ranks 30 s, then SIGKILLs them and exits 1 even when they
checkpointed and exited 0. Our ranks handle SIGTERM / SIGUSR1 themselves (trainer.Preemption: agree at the
next step boundary, checkpoint, exit 0), so the node launcher only forwards the signal and waits.

The ranks get the environment the DeepSpeed launcher would give them (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_SIZE, MASTER_ADDR, MASTER_PORT, CROSS_RANK, CROSS_SIZE). This module imports no torch: it starts fast.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

JOBS = ("distill", "score", "prune", "evaluate", "plan", "cache_teacher")  # launch/<job>.py
# MASTER_PORT = PORT_BASE + SLURM_JOB_ID % PORT_SPAN: below Linux's ephemeral range (32768+), so a port picked
# for an outgoing connection does not take it; two jobs sharing a first node collide only every 15000 ids.
PORT_BASE, PORT_SPAN = 15000, 15000
FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
POLL_S = 0.5


class LaunchError(RuntimeError):
    """A launch cannot start: the message names the variable / option and what to do."""


def log(role: str, message: str) -> None:
    sys.stderr.write(f"[flexkd launcher {role}] {message}\n")  # one write: several nodes share the stream
    sys.stderr.flush()


# ------------------------------------------------------------------------------------------ layout (pure)


@dataclass(frozen=True)
class NodeLayout:
    """Where this node sits in the job: ``procs_per_node`` ranks on each of ``hostnames``."""

    hostnames: tuple[str, ...]
    node_rank: int
    procs_per_node: int
    master_port: int
    master_addr: str = ""  # empty: the first host

    def __post_init__(self) -> None:
        if not self.master_addr:
            object.__setattr__(self, "master_addr", self.hostnames[0])

    @property
    def nnodes(self) -> int:
        return len(self.hostnames)

    @property
    def world_size(self) -> int:
        return self.nnodes * self.procs_per_node

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.procs_per_node + local_rank

    def rank_env(self, local_rank: int) -> dict[str, str]:
        """The variables DeepSpeed's launcher sets for a rank (engine.init_distributed reads them)."""
        return {
            "RANK": str(self.global_rank(local_rank)),
            "LOCAL_RANK": str(local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_SIZE": str(self.procs_per_node),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "CROSS_RANK": str(self.node_rank),
            "CROSS_SIZE": str(self.nnodes),
        }

    def describe(self) -> str:
        first = self.global_rank(0)
        return (
            f"node {self.node_rank} of {self.nnodes} ({self.hostnames[self.node_rank]}): ranks "
            f"{first}-{first + self.procs_per_node - 1} of {self.world_size}, "
            f"master {self.master_addr}:{self.master_port}"
        )


def port_for_job(job_id: str | int) -> int:
    """The rendezvous port of SLURM job ``job_id`` (every node computes the same one)."""
    digits = re.sub(r"\D", "", str(job_id))  # array jobs: "1234_7" -> 12347
    if not digits:
        raise LaunchError(
            f"SLURM_JOB_ID={job_id!r} has no digits to derive MASTER_PORT from; set MASTER_PORT"
        )
    return PORT_BASE + int(digits) % PORT_SPAN


def gpus_per_node(environ: Mapping[str, str]) -> int | None:
    """GPUs SLURM gave this node: SLURM_GPUS_ON_NODE ("4"), else SLURM_GPUS_PER_NODE ("4", "a100:4",
    "gpu:a100:4"), else the count in CUDA_VISIBLE_DEVICES; None when none of them says."""
    if environ.get("SLURM_GPUS_ON_NODE", "").strip().isdigit():
        return int(environ["SLURM_GPUS_ON_NODE"])
    per_node = environ.get("SLURM_GPUS_PER_NODE", "").strip()
    match = re.fullmatch(r"(?:[\w.-]+:)*(\d+)(?:\(.*\))?", per_node)
    if match:
        return int(match.group(1))
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible and visible != "NoDevFiles":
        return len([d for d in visible.split(",") if d.strip()])
    return None


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    if not value.strip().isdigit():
        raise LaunchError(f"{name}={value!r}: expected a number set by SLURM; run under sbatch/srun")
    return int(value)


def slurm_layout(
    environ: Mapping[str, str], hostnames: Sequence[str], procs_per_node: int | None = None
) -> NodeLayout:
    """This node's layout from SLURM's variables and the expanded SLURM_JOB_NODELIST (``hostnames``).
    ``procs_per_node`` (the --procs-per-node option) wins over the GPU count SLURM reports; MASTER_PORT and
    MASTER_ADDR, when set, win over the derived port and the first host."""
    nnodes = _int_var(environ, "SLURM_NNODES")
    node_rank = _int_var(environ, "SLURM_NODEID")
    if len(hostnames) != nnodes:
        raise LaunchError(
            f"SLURM_JOB_NODELIST expands to {len(hostnames)} hosts ({', '.join(hostnames)}) but "
            f"SLURM_NNODES={nnodes}; launch one task per node (srun --ntasks-per-node=1 over the allocation)"
        )
    if not 0 <= node_rank < nnodes:
        raise LaunchError(f"SLURM_NODEID={node_rank} is outside 0..{nnodes - 1} (SLURM_NNODES={nnodes})")
    procs = procs_per_node if procs_per_node is not None else gpus_per_node(environ)
    if procs is None or procs < 1:
        raise LaunchError(
            "cannot tell how many ranks to start on this node: SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE and "
            "CUDA_VISIBLE_DEVICES are unset (ask for GPUs with #SBATCH --gpus-per-node=G) or pass "
            "--procs-per-node N (PROCS_PER_NODE in the sbatch script)"
        )
    port = environ.get("MASTER_PORT", "").strip()
    if port and not port.isdigit():
        raise LaunchError(f"MASTER_PORT={port!r} is not a port number")
    master_port = int(port) if port else port_for_job(environ.get("SLURM_JOB_ID", ""))
    master_addr = environ.get("MASTER_ADDR", "").strip()  # e.g. the InfiniBand address of the first node
    return NodeLayout(tuple(hostnames), node_rank, procs, master_port, master_addr)


def expand_nodelist(nodelist: str) -> list[str]:
    """``scontrol show hostnames`` of SLURM_JOB_NODELIST ("gpu[01-03]" -> gpu01, gpu02, gpu03)."""
    if not nodelist:
        raise LaunchError("SLURM_JOB_NODELIST is unset: run under sbatch/srun")
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as err:
        raise LaunchError(
            f"`scontrol show hostnames {nodelist}` failed ({err}); is scontrol on PATH?"
        ) from err
    return out.stdout.split()


def job_command(job: str, args: Sequence[str], root: Path) -> list[str]:
    """[script, *args] for a job name (launch/<job>.py under ``root``) or a path to a Python script."""
    if job in JOBS:
        script = root / "launch" / f"{job}.py"
    elif job.endswith(".py"):
        script = Path(job) if Path(job).is_absolute() else root / job
    else:
        raise LaunchError(f"job {job!r}: expected one of {', '.join(JOBS)} or a path to a .py script")
    if not script.is_file():
        raise LaunchError(f"{script} not found: submit from the repository root (or set FLEXKD_ROOT)")
    return [str(script), *args]


def script_args(
    passthrough: Sequence[str], job: str, config: str, output_dir: str, overrides: str
) -> tuple[str, list[str]]:
    """(job, script arguments): a leading job name / .py path in ``passthrough`` replaces ``job``; the
    CONFIG / OUTPUT_DIR / OVERRIDES values come first so arguments given on the command line win."""
    rest = list(passthrough)
    if rest and (rest[0] in JOBS or rest[0].endswith(".py")):
        job = rest.pop(0)
    head = ["--config", config] if config else []
    head += [f"output_dir={output_dir}"] if output_dir else []
    return job, [*head, *shlex.split(overrides), *rest]


# -------------------------------------------------------------------------------------- process handling


def exit_code(returncode: int) -> int:
    """A shell-style status: a child killed by signal N gives 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class Forwarder:
    """Installs handlers for ``FORWARDED`` signals that pass each one on to ``targets()`` (still running)
    and remember it; ``first`` is the first signal received."""

    def __init__(self, targets) -> None:
        self.targets, self.first = targets, None
        for sig in FORWARDED:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.first = self.first or signal.Signals(signum)
        self.forward(signum)

    def forward(self, signum: int) -> None:
        for proc in self.targets():
            if proc.poll() is None:
                proc.send_signal(signum)


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM what still runs, then SIGKILL after ``grace_s`` (a rank blocked in a collective whose peer died
    does not return to the step boundary where it would act on SIGTERM)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_node(layout: NodeLayout, command: Sequence[str], grace_s: float = 10.0) -> int:
    """Start this node's ranks (``python -u command`` each, with its rank environment), forward SIGUSR1 /
    SIGTERM / SIGINT to them, and wait. A rank that fails stops the others (SIGTERM, SIGKILL after
    ``grace_s``) and gives this node's exit status, so ``srun --kill-on-bad-exit`` stops the other nodes."""
    role = f"node {layout.node_rank}"
    base = dict(os.environ)
    if "OMP_NUM_THREADS" not in base and layout.procs_per_node > 1:  # torch's default: every core per rank
        base["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // layout.procs_per_node))
    log(role, layout.describe())
    procs: list[subprocess.Popen] = []
    forwarder = Forwarder(lambda: procs)
    for local_rank in range(layout.procs_per_node):
        env = {**base, **layout.rank_env(local_rank)}
        procs.append(subprocess.Popen([sys.executable, "-u", *command], env=env))
    if forwarder.first is not None:  # came while the ranks were being started: tell the late ones too
        forwarder.forward(forwarder.first)
    while True:
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            local_rank, code = failed[0]
            log(role, f"rank {layout.global_rank(local_rank)} exited with status {exit_code(code)}; "
                      "stopping this node's other ranks")  # fmt: skip
            stop_all(procs, grace_s)
            return exit_code(code)
        if all(c == 0 for c in codes):
            done = f" after {forwarder.first.name}" if forwarder.first else ""
            log(role, f"all {layout.procs_per_node} ranks exited 0{done}")
            return 0
        time.sleep(POLL_S)


def supervise(command: Sequence[str], job_id: str, requeue_signals=(signal.SIGUSR1,)) -> int:
    """Run ``command`` (the srun step) as the batch step's child. SIGUSR1 (``--signal=B:USR1@T``: the time
    limit is near) is forwarded to it; the ranks checkpoint and exit; then the job is requeued with
    ``scontrol requeue`` and resumes from the checkpoint (train.resume=auto). SIGTERM / SIGINT are forwarded
    without a requeue: ``scancel`` means stop, and a preempting SLURM requeues a --requeue job itself."""
    started: list[subprocess.Popen] = []
    forwarder = Forwarder(lambda: started)  # before the start: a signal must never end the supervisor
    started.append(subprocess.Popen(list(command)))
    if forwarder.first is not None:
        forwarder.forward(forwarder.first)
    code = exit_code(started[0].wait())
    if forwarder.first not in requeue_signals:
        return code
    log("supervise", f"{forwarder.first.name} received; step exited with status {code}; "
                     f"requeueing job {job_id}")  # fmt: skip
    requeue = subprocess.run(["scontrol", "requeue", job_id])
    if requeue.returncode != 0:
        log(
            "supervise", f"`scontrol requeue {job_id}` failed (status {requeue.returncode}): resubmit by hand"
        )
        return requeue.returncode
    return 0


# ------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flexkd_ds.launcher",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    node = sub.add_parser(
        "node",
        help="per-node launcher (one srun task per node): start this node's ranks",
        description="Start this node's ranks with RANK / WORLD_SIZE / MASTER_* derived from SLURM_NNODES, "
        "SLURM_NODEID, SLURM_JOB_NODELIST (scontrol show hostnames; the first host is the master), the GPU "
        "count (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE) and SLURM_JOB_ID (port "
        f"{PORT_BASE} + id % {PORT_SPAN}); MASTER_PORT / MASTER_ADDR, when set, win. Arguments after -- go to "
        "the job; a first one naming a job (distill, score, evaluate, plan) or a .py script replaces --job.",
    )
    node.add_argument(
        "--job", default="distill", help="distill | score | evaluate | plan | path/to/script.py"
    )
    node.add_argument("--config", default="", help="--config passed to the job (empty: none)")
    node.add_argument("--output-dir", default="", help="output_dir=... passed to the job (empty: none)")
    node.add_argument("--overrides", default="", help="extra key=value overrides, one shell-quoted string")
    node.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: GPUs)")
    node.add_argument("--root", default=os.environ.get("FLEXKD_ROOT", "."), help="repository root")
    node.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    node.add_argument("--dry-run", action="store_true", help="print the layout and command; start nothing")
    node.add_argument("args", nargs=argparse.REMAINDER, help="-- then the job's own arguments")
    sup = sub.add_parser(
        "supervise",
        help="batch-step supervisor: run the srun step, requeue the job after SIGUSR1",
        description="Run the command after --; forward SIGUSR1 / SIGTERM / SIGINT to it; after SIGUSR1, "
        "once it has exited, `scontrol requeue $SLURM_JOB_ID`.",
    )
    sup.add_argument("args", nargs=argparse.REMAINDER, help="-- then the srun command")
    return parser.parse_args(argv)


def _after_dashes(args: Sequence[str]) -> list[str]:
    return list(args[1:]) if args and args[0] == "--" else list(args)


def main(argv: Sequence[str] | None = None) -> int:
    ns = parse_args(argv)
    try:
        if ns.command == "supervise":
            command = _after_dashes(ns.args)
            if not command:
                raise LaunchError("supervise: nothing to run; give the srun command after --")
            job_id = os.environ.get("SLURM_JOB_ID", "")
            if not job_id:
                raise LaunchError("SLURM_JOB_ID is unset: run the sbatch script with sbatch")
            return supervise(command, job_id)
        job, args = script_args(_after_dashes(ns.args), ns.job, ns.config, ns.output_dir, ns.overrides)
        command = job_command(job, args, Path(ns.root))
        hosts = expand_nodelist(os.environ.get("SLURM_JOB_NODELIST", ""))
        layout = slurm_layout(os.environ, hosts, ns.procs_per_node)
        if ns.dry_run:
            # One write: the nodes share srun's stdout, and unbuffered prints of two nodes could interleave.
            sys.stdout.write(f"{layout.describe()}\n{shlex.join([sys.executable, '-u', *command])}\n")
            sys.stdout.flush()
            return 0
        return run_node(layout, command, ns.grace)
    except LaunchError as err:
        log(ns.command, f"error: {err}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
