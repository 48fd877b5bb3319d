"""Helpers for the end-to-end tests: launch the real jobs (``deepspeed`` on CPU ranks, or a plain ``python``
process), read their artifacts, compare weights with a verbose report."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "launch" / "recipes" / "tiny.yaml"
DISTILL = "launch/distill.py"
SCORE = "launch/score.py"
# Variables a launcher sets for its ranks: inherited ones would make a plain ``python`` job join a group.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK",
              "CROSS_SIZE", "NODE_RANK", "GROUP_RANK")  # fmt: skip


def load_script(path: Path, name: str | None = None):
    """Import a script that is not a package module (``bench/*.py``, ``launch/*.py``) from its file."""
    spec = importlib.util.spec_from_file_location(name or f"{path.parent.name}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WordTokenizer:
    """One token per whitespace word (the call signature of a HF tokenizer): lengths countable by eye."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split())))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.update(extra or {})
    return env


def job_command(script: str, args: Sequence[str], nprocs: int, port: int | None = None) -> list[str]:
    """``deepspeed --num_gpus N --master_port P script args`` (CPU ranks here), or ``python script args``."""
    if nprocs == 1:
        return [sys.executable, script, *args]
    port = port or free_port()
    runner = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port", str(port)]
    return [sys.executable, *runner, script, *args]


def recipe_args(output_dir: Path | str, overrides: Sequence[str] = ()) -> list[str]:
    return ["--config", str(RECIPE), f"output_dir={output_dir}", *overrides]


class JobResult:
    def __init__(self, cmd: list[str], returncode: int, output: str, seconds: float) -> None:
        self.cmd, self.returncode, self.output, self.seconds = cmd, returncode, output, seconds

    def tail(self, chars: int = 6000) -> str:
        return (
            f"$ {' '.join(self.cmd)}\n(exit {self.returncode} after {self.seconds:.1f} s)\n"
            + self.output[-chars:]
        )


class RunningJob:
    """A job started with ``start_job``; its output (stdout + stderr) goes to ``<output_dir>.log``."""

    def __init__(self, cmd: list[str], proc: subprocess.Popen, log_path: Path, offset: int) -> None:
        self.cmd, self.proc, self.log_path, self.offset = cmd, proc, log_path, offset
        self.start = time.perf_counter()

    def wait(self, timeout: float) -> JobResult:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait()
            raise AssertionError(f"job timed out after {timeout} s:\n{self.result().tail()}") from None
        return self.result()

    def result(self) -> JobResult:
        with open(self.log_path, "rb") as log:
            log.seek(self.offset)
            output = log.read().decode(errors="replace")
        return JobResult(self.cmd, self.proc.returncode, output, time.perf_counter() - self.start)


def start_job(
    script: str,
    output_dir: Path,
    overrides: Sequence[str] = (),
    *,
    nprocs: int = 2,
    env: Mapping[str, str] | None = None,
) -> RunningJob:
    """Start ``script`` with the tiny recipe + ``overrides`` from the repo root (``nprocs`` CPU ranks, or a
    plain process for 1). Output is appended to ``<output_dir>.log`` (a resumed run follows the first)."""
    cmd = job_command(script, recipe_args(output_dir, overrides), nprocs)
    log_path = Path(f"{output_dir}.log")
    with open(log_path, "a") as log:
        offset = log.tell()  # this run's output starts here (the command line is NOT in it: tests grep it)
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=job_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return RunningJob(cmd, proc, log_path, offset)


def kill_tree(pid: int) -> None:
    """SIGKILL a job started by ``start_job`` and every process under it (its own session)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def run_job(
    script: str,
    output_dir: Path,
    overrides: Sequence[str] = (),
    *,
    nprocs: int = 2,
    timeout: float = 300,
    env: Mapping[str, str] | None = None,
    check: bool = True,
) -> JobResult:
    """Run a job to the end (see ``start_job``). ``check``: fail the test, with the log tail, unless it
    exits 0. A launch that lost its free port to another process (EADDRINUSE) is retried once."""
    for attempt in range(2):
        result = start_job(script, output_dir, overrides, nprocs=nprocs, env=env).wait(timeout)
        if not (result.returncode and "EADDRINUSE" in result.output and attempt == 0):
            break
    if check and result.returncode != 0:
        raise AssertionError(f"job failed:\n{result.tail()}")
    return result


def read_metrics(output_dir: Path) -> list[dict]:
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def student_state(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(output_dir) / "student" / "model.safetensors"))


def assert_states_close(
    actual: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    atol: float,
    rtol: float = 0.0,
) -> None:
    """Same keys and shapes, and every tensor close; the message names the worst tensor and where."""
    assert sorted(actual) == sorted(expected), f"keys differ: {sorted(set(actual) ^ set(expected))}"
    worst = (0.0, "", None)
    for name in expected:
        a, e = actual[name].double(), expected[name].double()
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        excess = ((a - e).abs() - rtol * e.abs()).max().item() if e.numel() else 0.0
        if excess > worst[0]:
            where = int(((a - e).abs() - rtol * e.abs()).flatten().argmax())
            worst = (excess, name, (where, a.flatten()[where].item(), e.flatten()[where].item()))
    if worst[0] > atol:
        where, a_val, e_val = worst[2]
        raise AssertionError(
            f"weights differ: worst {worst[1]}[flat {where}] = {a_val!r} vs {e_val!r} "
            f"(|diff| - rtol|expected| = {worst[0]:.3g} > atol {atol:g})"
        )


def max_abs_diff(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_recipe(
    recipe: Path, tmp_path: Path, overrides: Sequence[str] = (), nprocs: int = 2, check: bool = True
):
    """``launch/distill.py --config recipe output_dir=<tmp_path>/run overrides`` to the end: (output_dir, the
    completed process). ``check``: fail the test with the output's tail unless it exits 0."""
    out = tmp_path / "run"
    cmd = job_command(DISTILL, ["--config", str(recipe), f"output_dir={out}", *overrides], nprocs)
    proc = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc
