"""Job setup without a launch (``flexkd_ds.jobs.common``): a pretrained student from a local directory, and dataset
columns renamed by ``data.field_map``. Single process, tiny models, seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _helpers import RECIPE, REPO, job_env

from flexkd_ds.inputs import models
from flexkd_ds.inputs.config import ConfigError, load_config
from flexkd_ds.jobs.common import load_rows, model_specs


def test_pretrained_student_from_local_dir(tmp_path):
    # the tiny recipe's student shape, saved as a Hugging Face directory and named as model.student
    config = models.tiny_config("llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=259)
    saved = models.build_causal_lm_from_config(config, seed=7, dtype=torch.float32)
    student_dir = tmp_path / "student"
    saved.save_pretrained(student_dir)

    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'out'}", f"model.student={student_dir}",
                               "model.student_arch=null"])  # fmt: skip
    _, student, _ = model_specs(cfg)
    assert student.name == str(student_dir)  # the name as the user wrote it goes into artifacts
    assert student.width == 32
    loaded = student.load(torch.float32).state_dict()
    for name, tensor in saved.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)


def test_field_map_renames_hub_style_columns(tmp_path):
    # databricks-dolly-15k's own columns: instruction / context / response
    path = tmp_path / "dolly.jsonl"
    records = [
        {"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
        {
            "instruction": "Summarise.",
            "context": "Cats sleep a lot.",
            "response": "Cats sleep.",
            "category": "x",
        },
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'out'}", f"data.train={path}",
                               "data.field_map={input: context, output: response}"])  # fmt: skip
    rows = list(load_rows(cfg, cfg.data.train, cfg.data.train_split, None))
    assert [r.instruction for r in rows] == ["Name a colour.", "Summarise."]
    assert [r.input for r in rows] == ["", "Cats sleep a lot."]
    assert [r.response for r in rows] == ["Blue.", "Cats sleep."]


def test_field_map_without_it_names_the_missing_column(tmp_path):
    path = tmp_path / "dolly.jsonl"
    path.write_text(json.dumps({"instruction": "Name a colour.", "context": "", "response": "Blue."}) + "\n")
    cfg = load_config(RECIPE, [f"output_dir={tmp_path / 'out'}", f"data.train={path}"])
    with pytest.raises(ValueError, match="output"):
        load_rows(cfg, cfg.data.train, cfg.data.train_split, None)


@pytest.mark.parametrize("mapping", ["{answer: response}", "{output: 3}", "{output: ''}"])
def test_field_map_bad_keys_are_named(tmp_path, mapping):
    with pytest.raises(ConfigError, match=r"data\.field_map"):
        load_config(RECIPE, [f"output_dir={tmp_path}", f"data.field_map={mapping}"])


def run_script(tmp_path, text: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``text`` as a Python script in a fresh process from the repository root; it must exit 0."""
    script = tmp_path / "script.py"
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, env=job_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


SHUTDOWN_SCRIPT = """
import os, socket
import torch.distributed as dist
from flexkd_ds.jobs.common import expected_errors
from flexkd_ds.runtime.dist import init_distributed
with expected_errors("t.py"):
    init_distributed()
    assert dist.is_initialized()
print("after success, initialized:", dist.is_initialized())
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    os.environ["MASTER_PORT"] = str(s.getsockname()[1])
try:
    with expected_errors("t.py"):
        init_distributed()
        raise ValueError("bad option x")
except SystemExit as e:
    print("error exit", e.code, "initialized:", dist.is_initialized())
"""


def test_a_job_that_ends_well_destroys_its_process_group_and_one_that_fails_does_not(tmp_path):
    """Left to interpreter exit, gloo's threads could abort a finished 2-rank job ("terminate called without
    an active exception", non-zero exit; once in CI). A launch script's ``expected_errors`` now destroys the
    group when the job ends well, and not after an error (a peer may still be in a collective)."""
    proc = run_script(tmp_path, SHUTDOWN_SCRIPT)
    assert "after success, initialized: False" in proc.stdout
    assert "error exit 1 initialized: True" in proc.stdout and "t.py: error: bad option x" in proc.stderr


DEPRECATION_SCRIPT = """
import warnings
import torch
import torch.distributed as dist
from flexkd_ds.runtime.dist import init_distributed, shutdown
init_distributed()
with warnings.catch_warnings(record=True) as caught:
    out = torch.zeros(2)
    dist.all_gather_into_tensor(out, torch.ones(2))  # what DeepSpeed's ZeRO-3 gathers call
print("future warnings:", [str(w.message)[:50] for w in caught if issubclass(w.category, FutureWarning)])
shutdown()
"""


def test_a_job_does_not_print_torchs_deprecation_of_the_collective_deepspeed_calls(tmp_path):
    """torch 2.13 deprecates ``all_gather_into_tensor``; DeepSpeed's ZeRO-3 gathers call it, so every rank of
    every ZeRO-3 job printed a FutureWarning the user cannot act on (the quickstart, 2026-12-04)."""
    proc = run_script(tmp_path, DEPRECATION_SCRIPT)
    assert "future warnings: []" in proc.stdout


EVALUATE_SHUTDOWN_SCRIPT = """
import importlib.util, sys
import torch.distributed as dist
from flexkd_ds.runtime.dist import init_distributed
spec = importlib.util.spec_from_file_location("evaluate_cli", "launch/evaluate.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)
cli.run_evaluate = lambda opts: init_distributed()  # the evaluation itself is tested elsewhere
cli.main(["--model", "s=unused", "--data", "d=unused.jsonl", "--out", sys.argv[1]])
print("after success, initialized:", dist.is_initialized())
"""


def test_an_evaluation_that_ends_well_destroys_its_process_group(tmp_path):
    """launch/evaluate.py has its own error handling (not ``expected_errors``); it too must destroy the process
    group after a successful run, or a multi-rank evaluation is open to the same gloo abort at exit."""
    proc = run_script(tmp_path, EVALUATE_SHUTDOWN_SCRIPT, str(tmp_path / "out"))
    assert "after success, initialized: False" in proc.stdout
