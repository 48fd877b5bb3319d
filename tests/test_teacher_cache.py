"""The offline teacher cache (teacher_cache.dir): distill on a cache reproduces distill on the live teacher,
and every unusable cache is refused. The reference is always the live-teacher run, never the cache code."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from flexkd_ds.inputs import teacher_cache as store
from tests._helpers import (
    DISTILL,
    assert_states_close,
    kill_tree,
    max_abs_diff,
    run_job,
    start_job,
    student_state,
)

CACHE = "launch/cache_teacher.py"
STEPS = ["train.max_steps=4", "train.save_every=0"]  # short: the check is equality, not learning


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The live-teacher run and the fp32-cache run (one command: builds the cache, then trains)."""
    root = tmp_path_factory.mktemp("teacher_cache")
    live = run_job(DISTILL, root / "live", STEPS, nprocs=1)
    cache = root / "cache_fp32"
    cached = run_job(
        DISTILL, root / "fp32", [*STEPS, f"teacher_cache.dir={cache}", "teacher_cache.dtype=fp32",
                                 "teacher_cache.shard_examples=64"], nprocs=1,
    )  # fmt: skip
    return {"root": root, "live": live, "cached": cached, "cache": cache}


def test_fp32_cache_trains_the_same_student_as_the_live_teacher(runs):
    assert "building it with the teacher first" in runs["cached"].output
    assert "the teacher's body is not loaded" in runs["cached"].output
    live, cached = student_state(runs["root"] / "live"), student_state(runs["root"] / "fp32")
    diff = max_abs_diff(cached, live)
    print(f"fp32 cache vs live teacher: max |diff| of the student's weights = {diff:.3g}")
    assert_states_close(cached, live, atol=1e-5)
    manifest = json.loads((runs["cache"] / store.MANIFEST).read_text())
    assert manifest["num_examples"] == 200 and manifest["d_teacher"] == 64 and manifest["dtype"] == "fp32"
    assert manifest["bytes_per_token"] == 256 and len(manifest["shards"]) == 4
    assert (runs["cache"] / store.COMPLETE).is_file()


def test_bf16_cache_is_close_to_the_live_teacher(runs):
    out = runs["root"] / "bf16"
    run_job(DISTILL, out, [*STEPS, f"teacher_cache.dir={runs['root'] / 'cache_bf16'}"], nprocs=1)
    diff = max_abs_diff(student_state(out), student_state(runs["root"] / "live"))
    print(f"bf16 cache vs live teacher: max |diff| of the student's weights = {diff:.3g}")
    assert diff < 5e-3  # bf16 rounding of the hidden states (8 bits of mantissa), 4 steps at lr 1e-3


@pytest.mark.parametrize(
    "override, field",
    [("model.teacher_arch.hidden_size=48", "head_sha256"), ("data.max_length=96", "max_length")],
)
def test_a_cache_for_another_run_is_refused(runs, override, field):
    result = run_job(
        DISTILL, runs["root"] / f"refused_{field}",
        [*STEPS, f"teacher_cache.dir={runs['cache']}", "teacher_cache.dtype=fp32", override],
        nprocs=1, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert (
        "was made for another run; differing fields" in result.output and f"{field}: cache" in result.output
    )
    assert "point teacher_cache.dir at a new directory" in result.output


def test_the_dtype_is_checked(runs):
    manifest = json.loads((runs["cache"] / store.MANIFEST).read_text())
    expected = {k: manifest[k] for k in store.CHECKED_FIELDS} | {"dtype": "bf16"}
    with pytest.raises(store.TeacherCacheError, match="dtype: cache 'fp32', this run 'bf16'"):
        store.TeacherCache.open(runs["cache"], expected)


def test_a_corrupted_shard_is_refused(runs, tmp_path):
    copy = tmp_path / "corrupt"
    shutil.copytree(runs["cache"], copy)
    shard = copy / "shard-r00000-s00001.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-8] ^= 0xFF  # one byte of one hidden value
    shard.write_bytes(bytes(raw))
    with pytest.raises(
        store.TeacherCacheError, match="shard-r00000-s00001.safetensors is missing or its sha256"
    ):
        store.TeacherCache.open(copy)


def test_an_incomplete_cache_is_never_read_and_distill_finishes_it(runs, tmp_path):
    copy = tmp_path / "partial"
    shutil.copytree(runs["cache"], copy)
    for name in (
        store.COMPLETE,
        store.MANIFEST,
        "shard-r00000-s00002.json",
        "shard-r00000-s00002.safetensors",
    ):
        (copy / name).unlink()
    with pytest.raises(store.TeacherCacheError, match="is incomplete"):
        store.TeacherCache.open(copy)
    out = tmp_path / "resumed"
    result = run_job(
        DISTILL, out, [*STEPS, f"teacher_cache.dir={copy}", "teacher_cache.dtype=fp32",
                       "teacher_cache.shard_examples=64"], nprocs=1,
    )  # fmt: skip
    assert "resuming, 3 shard(s)" in result.output and "(1 built now" in result.output
    assert_states_close(student_state(out), student_state(runs["root"] / "live"), atol=1e-5)
    rebuilt = json.loads((copy / store.MANIFEST).read_text())["shards"]
    original = json.loads((runs["cache"] / store.MANIFEST).read_text())["shards"]
    assert [s["sha256"] for s in rebuilt] == [s["sha256"] for s in original]


def test_features_that_need_the_teacher_body_are_refused(tmp_path):
    result = run_job(
        DISTILL, tmp_path / "o", [f"teacher_cache.dir={tmp_path / 'c'}", "data.responses=teacher"],
        nprocs=1, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "data.responses=teacher" in result.output
    assert "drop teacher_cache.dir" in result.output and "data.responses=dataset" in result.output
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_two_ranks_fp32_cache_trains_the_same_student_as_the_live_teacher(tmp_path):
    """The issue's exactness check at its own shape: tiny.yaml on 2 ranks (each rank reads its examples'
    rows from shards that both ranks wrote)."""
    run_job(DISTILL, tmp_path / "live", STEPS, nprocs=2)
    run_job(
        DISTILL, tmp_path / "fp32", [*STEPS, f"teacher_cache.dir={tmp_path / 'c'}", "teacher_cache.dtype=fp32",
                                     "teacher_cache.shard_examples=32"], nprocs=2,
    )  # fmt: skip
    assert {s["file"][:13] for s in json.loads((tmp_path / "c" / store.MANIFEST).read_text())["shards"]} == {
        "shard-r00000-", "shard-r00001-"}  # fmt: skip
    live, cached = student_state(tmp_path / "live"), student_state(tmp_path / "fp32")
    print(f"2 ranks, fp32 cache vs live teacher: max |diff| = {max_abs_diff(cached, live):.3g}")
    assert_states_close(cached, live, atol=1e-5)
    run_job(DISTILL, tmp_path / "bf16", [*STEPS, f"teacher_cache.dir={tmp_path / 'c16'}"], nprocs=2)
    diff = max_abs_diff(student_state(tmp_path / "bf16"), live)
    print(f"2 ranks, bf16 cache vs live teacher: max |diff| = {diff:.3g}")
    assert diff < 5e-3


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_a_killed_build_resumes_and_equals_an_uninterrupted_one(tmp_path, how):
    """SIGKILL or SIGTERM one rank of a 2-rank build mid-way: no marker; the rerun completes with the same
    shards."""
    import psutil

    small = ["teacher_cache.shard_examples=8"]
    whole = tmp_path / "whole"
    run_job(CACHE, tmp_path / "o_whole", [f"teacher_cache.dir={whole}", *small], nprocs=2)
    killed = tmp_path / "killed"
    job = start_job(
        CACHE, tmp_path / "o_killed", [f"teacher_cache.dir={killed}", *small], nprocs=2,
        env={"FLEXKD_CACHE_SHARD_DELAY_S": "1"},
    )  # fmt: skip
    deadline = time.time() + 240
    while len(list(killed.glob("shard-r00001-*.json"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    ranks = [
        p for p in psutil.Process(job.proc.pid).children(recursive=True)
        if "cache_teacher.py" in " ".join(p.cmdline()) and "--local_rank=1" in " ".join(p.cmdline())
    ]  # fmt: skip
    assert ranks, "rank 1 of the build not found"
    getattr(ranks[0], how)()
    result = job.wait(120)
    kill_tree(job.proc.pid)
    assert result.returncode != 0 and not (killed / store.COMPLETE).exists()
    partial = len(list(killed.glob("shard-*.json")))
    assert partial < len(list(whole.glob("shard-*.json")))
    rerun = run_job(CACHE, tmp_path / "o_killed", [f"teacher_cache.dir={killed}", *small], nprocs=2)
    assert "resuming" in rerun.output
    shards = [json.loads((d / store.MANIFEST).read_text())["shards"] for d in (whole, killed)]
    assert [(s["file"], s["sha256"]) for s in shards[0]] == [(s["file"], s["sha256"]) for s in shards[1]]
    assert (killed / store.COMPLETE).is_file()
