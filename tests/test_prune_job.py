"""The prune job (launch/prune.py) and distill with model.student_init=pruned, on the tiny recipe's random
LLaMA teacher (64 wide, 2 layers): the written student is the plan applied to the teacher by the in-memory
path (method.prune.prune_model), the 2-rank ZeRO-3 path writes the same student and plan as one process, and
bad requests stop before anything is written."""

from __future__ import annotations

import json

import pytest
import torch
from _helpers import DISTILL, RECIPE, run_job
from safetensors.torch import load_file

from flexkd_ds.inputs.config import load_config
from flexkd_ds.jobs.common import model_specs
from flexkd_ds.method import prune

PRUNE = "launch/prune.py"
WIDTH = ["model.student_arch={from_teacher: true, hidden_size: 32}"]


def written(out):
    student = out / "pruned_student"
    record = json.loads((student / "prune.json").read_text())
    return record, load_file(str(student / "model.safetensors"))


def reference_student(out, record):
    """The teacher the job built (same recipe and seed) cut by the recorded plan in memory."""
    cfg = load_config(RECIPE, [f"output_dir={out}", *WIDTH, "model.student_init=pruned"])
    teacher, _, _ = model_specs(cfg)
    plan = prune.PrunePlan(**record["plan"])
    return prune.prune_model(teacher.load(torch.float32), plan).state_dict()


def test_prune_job_writes_the_plan_applied_to_the_teacher(tmp_path):
    out = tmp_path / "one"
    run_job(PRUNE, out, [*WIDTH, "prune.num_layers=1", "prune.intermediate_size=96"], nprocs=1)
    record, state = written(out)
    plan = record["plan"]
    assert record["d_student"] == 32 and len(plan["units"]) == 32 and len(plan["layers"]) == 1
    assert all(len(row) == 96 for row in plan["mlp_neurons"])
    imp = load_file(str(out / "importance.safetensors"))
    assert plan["units"] == imp["indices"].tolist()  # file order: student unit m is teacher unit indices[m]
    assert record["importance_sha256"] and plan["norm_scales"]  # calibrated by default
    expected = reference_student(out, record)
    assert set(state) <= set(expected)
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["prune.num_layers=3"], "prune.num_layers=3 is out of range"),
        (["prune.intermediate_size=100000"], "prune.intermediate_size=100000 is out of range"),
        (["model.student_arch.hidden_size=64"], "d_S"),
        (["model.student_arch.hidden_size=30"], "use a multiple of 4, e.g. 28 or 32"),  # 4 heads: LlamaConfig
        (
            [
                "model.teacher_arch={family: bert, hidden_size: 64, num_layers: 2, num_heads: 4, vocab_size: 259}"
            ],
            "family",
        ),
    ],
)
def test_bad_requests_stop_before_anything_is_written(tmp_path, overrides, message):
    out = tmp_path / "bad"
    result = run_job(PRUNE, out, [*WIDTH, *overrides], nprocs=1, check=False)
    assert result.returncode != 0 and message in result.output, result.tail()
    assert not out.exists()


def test_importance_file_of_another_teacher_is_refused(tmp_path):
    out = tmp_path / "mine"
    run_job(PRUNE, out, WIDTH, nprocs=1)
    before = (out / "importance.safetensors").read_bytes()
    result = run_job(PRUNE, out, [*WIDTH, "model.teacher_arch.hidden_size=48"], nprocs=1, check=False)
    assert result.returncode != 0 and "was computed for" in result.output, result.tail()
    assert "importance.recompute=true" in result.output  # says what to do
    assert (out / "importance.safetensors").read_bytes() == before  # the input file is left as it was


@pytest.mark.slow
def test_two_rank_zero3_prune_and_distill_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    overrides = [*WIDTH, "prune.num_layers=1", "model.student_init=pruned", "train.max_steps=2"]
    run_job("launch/distill.py", one, overrides, nprocs=1)
    run_job("launch/distill.py", two, overrides, nprocs=2)
    (rec1, state1), (rec2, state2) = written(one), written(two)
    assert rec1["plan"]["units"] == rec2["plan"]["units"] and rec1["plan"]["layers"] == rec2["plan"]["layers"]
    for name, scale in rec1["plan"]["norm_scales"].items():
        assert rec2["plan"]["norm_scales"][name] == pytest.approx(scale, rel=1e-6)
    for name, tensor in state1.items():
        torch.testing.assert_close(state2[name], tensor, rtol=1e-6, atol=1e-7)
    expected = reference_student(two, rec2)
    for name, tensor in state2.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-6, atol=1e-7)
    assert (two / "student" / "config.json").is_file()  # trained on and exported


def test_a_pruned_student_dir_is_paired_by_its_cut_unless_asked_otherwise(tmp_path):
    """model.student=<a launch/prune.py dir>: Flex-KD pairs student unit m with the teacher unit it was cut
    from (prune.json's plan.units, read here by the test); loss.unit_pairing=importance pairs by the run's own
    importance file instead; a prune.json of another teacher is refused before anything is written."""
    run_job(PRUNE, tmp_path / "p", WIDTH, nprocs=1)
    cut = tmp_path / "p" / "pruned_student"
    units = json.loads((cut / "prune.json").read_text())["plan"]["units"]
    student = [
        f"model.student={cut}",
        "model.student_arch=null",
        "train.max_steps=2",
        "loss.feature_loss=flexkd",
    ]

    run_job(DISTILL, tmp_path / "auto", student, nprocs=1)
    pairing = json.loads((tmp_path / "auto" / "unit_pairing.json").read_text())
    assert pairing["pairing"] == "pruning" and pairing["units"] == units
    assert not (tmp_path / "auto" / "importance.safetensors").exists()  # no importance pass was needed

    # another scoring set: the importance pass ranks the units differently from the cut's
    run_job(DISTILL, tmp_path / "imp", [*student, "loss.unit_pairing=importance", "importance.num_examples=8"],
            nprocs=1)  # fmt: skip
    pairing = json.loads((tmp_path / "imp" / "unit_pairing.json").read_text())
    indices = load_file(str(tmp_path / "imp" / "importance.safetensors"))["indices"].tolist()
    assert pairing["pairing"] == "importance" and pairing["units"] == indices

    other = run_job(DISTILL, tmp_path / "other", [*student, "model.teacher_arch.num_layers=3"], nprocs=1,
                    check=False)  # fmt: skip
    assert other.returncode != 0 and "does not describe this pair" in other.output, other.tail()
    assert "loss.unit_pairing=importance" in other.output and not (tmp_path / "other").exists()

    random = ["loss.unit_pairing=pruning"]  # tiny.yaml: a random student
    refused = run_job(DISTILL, tmp_path / "random", random, nprocs=1, check=False)
    assert refused.returncode != 0 and "needs a pruned student" in refused.output, refused.tail()
