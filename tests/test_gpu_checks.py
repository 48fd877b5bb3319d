"""bench/gpu_checks.sh runs only on a GPU machine, rarely and against a clock: check here, on CPU, that it parses,
that every bench script it calls accepts the arguments it passes, and that ONLY= selects parts."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest
from _helpers import REPO

SCRIPT = REPO / "bench" / "gpu_checks.sh"


def bench_calls() -> list[tuple[str, list[str]]]:
    """(script, arguments) of every ``part NAME LIMIT "$PY" bench/x.py ...`` line, continuations joined."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        if not line.startswith("part "):
            continue
        words = shlex.split(line.replace('"$PY"', "PY").replace('"$OUT', '"OUT').replace('"$teacher"', "TEACHER"))
        if "PY" in words and words[words.index("PY") + 1].startswith("bench/"):
            at = words.index("PY") + 1
            calls.append((words[at], words[at + 1 :]))
    return calls


def test_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_bench_arguments_parse():
    calls = bench_calls()
    scripts = {script for script, _ in calls}
    assert {"bench/kernel_bench.py", "bench/logit_memory.py", "bench/gpu_tune.py", "bench/step_overhead.py",
            "bench/cache_speed.py"} <= scripts, scripts  # fmt: skip
    for script, argv in calls:
        spec = importlib.util.spec_from_file_location(re.sub(r"\W", "_", script), REPO / script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            module.parse_args(argv)
        except SystemExit as err:  # argparse refuses an option the script no longer has
            pytest.fail(f"{script} refuses the arguments gpu_checks.sh passes: {argv} ({err})")


def test_only_selects_parts(tmp_path):
    env = {**os.environ, "ONLY": "no_such_part", "PY": sys.executable, "TMPDIR": str(tmp_path)}
    out = tmp_path / "out"
    run = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    log = (out / "log.txt").read_text()
    assert "===" not in log.replace("=== summary", ""), log  # no part ran
    assert not (tmp_path / "smollm2-shape").exists(), "the cache_speed teacher was built though not selected"
