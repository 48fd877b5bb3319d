"""Checkpoint completeness without DeepSpeed: a fake engine writes its shard the way DeepSpeed does; a
checkpoint is used only when its completion record lists every file at the size that was written
(the multi-rank kill / truncation / empty-``latest`` runs are in test_distill.py, marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexkd_ds.runtime import checkpoints as ck


class FakeEngine:
    """Writes one 'optimizer shard' per save; refuses to write ``latest`` (DeepSpeed does it too early)."""

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        assert save_latest is False, "latest must be written after every rank has finished"
        (Path(directory) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"x" * 100)


def test_save_writes_the_record_then_latest_and_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        ck.save_checkpoint(FakeEngine(), tmp_path, f"step{step:08d}", {}, {"step": step}, keep=2)
    assert (tmp_path / "latest").read_text() == "step00000006"
    assert ck.checkpoint_tags(tmp_path) == [
        "step00000006",
        "step00000004",
    ]  # step 2 deleted after 6 was complete
    record = json.loads((tmp_path / "step00000006" / ck.COMPLETE).read_text())
    assert record["world_size"] == 1
    assert record["files"] == {"flexkd_rank0.pt": (tmp_path / "step00000006" / "flexkd_rank0.pt").stat().st_size,
                               "zero_pp_rank_0_mp_rank_00_optim_states.pt": 100}  # fmt: skip
    assert ck.resumable_checkpoints(tmp_path, 1) == (["step00000006", "step00000004"], [])


def test_keep_zero_keeps_every_checkpoint(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(FakeEngine(), tmp_path, f"step{step:08d}", {}, {}, keep=0)
    assert len(ck.checkpoint_tags(tmp_path)) == 3


@pytest.fixture
def two(tmp_path):
    for step in (2, 4):
        ck.save_checkpoint(FakeEngine(), tmp_path, f"step{step:08d}", {}, {}, keep=0)
    return tmp_path


def test_a_truncated_file_makes_the_newest_unusable(two):
    shard = two / "step00000004" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 40)
    assert ck.checkpoint_problem(two, "step00000004") == f"{shard} has 40 bytes, 100 were written"
    usable, skipped = ck.resumable_checkpoints(two, 1)
    assert usable == ["step00000002"] and skipped == [f"step00000004: {shard} has 40 bytes, 100 were written"]


def test_a_missing_file_or_record_makes_it_unusable(two):
    (two / "step00000004" / "flexkd_rank0.pt").unlink()
    assert "flexkd_rank0.pt is missing" in ck.checkpoint_problem(two, "step00000004")
    (two / "step00000002" / ck.COMPLETE).unlink()
    assert "its save did not finish" in ck.checkpoint_problem(two, "step00000002")
    assert ck.resumable_checkpoints(two, 1)[0] == []


def test_another_world_size_is_named(two):
    problem = ck.checkpoint_problem(two, "step00000004", world_size=2)
    assert "written by 1 ranks, this job has 2" in problem and "train.resume=never" in problem


def test_latest_plays_no_part_in_choosing(two):
    (two / "latest").write_text("")  # truncated by a crash: the newest complete checkpoint is still found
    assert ck.resumable_checkpoints(two, 1)[0] == ["step00000004", "step00000002"]


def test_a_resume_with_another_world_size_is_refused_not_restarted(two):
    """The newest complete checkpoint was written by 1 rank: a 2-rank resume must stop with the reason (it
    would otherwise find no usable checkpoint, start from step 0 and train over this run)."""
    problem = ck.world_size_mismatch(two, 2)
    assert "written by 1 ranks, this job has 2" in problem
    assert ck.world_size_mismatch(two, 1) is None
