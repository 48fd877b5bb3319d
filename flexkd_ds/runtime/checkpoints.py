"""Checkpoints and export: DeepSpeed checkpoints with per-rank RNG and sampler state, and the consolidated
student weights for the Hugging Face export."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from flexkd_ds.runtime.dist import barrier

# ------------------------------------------------------------------------------------------ checkpoints

# Written by rank 0 inside a checkpoint after every rank's files are on disk: the files and their sizes.
COMPLETE = "flexkd_complete.json"
LATEST = "latest"
# Tests only: seconds each rank sleeps after DeepSpeed wrote its files and before the completion barrier,
# so that a rank can be killed while a save is in flight.
SAVE_DELAY_ENV = "FLEXKD_CHECKPOINT_SAVE_DELAY_S"
_TAG = re.compile(r"^step(\d+)$")

logger = logging.getLogger("flexkd_ds")


def checkpoint_tags(checkpoint_dir: str | os.PathLike) -> list[str]:
    """The ``step<N>`` checkpoint folders, newest (highest step) first."""
    directory = Path(checkpoint_dir)
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if p.is_dir() and _TAG.match(p.name)]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)), reverse=True)


def checkpoint_problem(
    checkpoint_dir: str | os.PathLike, tag: str, world_size: int | None = None
) -> str | None:
    """None when checkpoint ``tag`` is complete (its marker lists every file, each present at its recorded
    size, and a rank file per rank of ``world_size``); else what is wrong, in words."""
    tag_dir = Path(checkpoint_dir) / tag
    if not tag_dir.is_dir():
        return f"{tag_dir} does not exist"
    marker = tag_dir / COMPLETE
    if not marker.is_file():
        return f"{tag_dir} has no {COMPLETE}: its save did not finish (the job stopped while saving)"
    try:
        record = json.loads(marker.read_text())
        files = dict(record["files"])
    except (ValueError, KeyError, TypeError) as err:
        return f"{marker} is unreadable ({err})"
    for name, size in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were written"
    if world_size is not None and record.get("world_size") != world_size:
        return (
            f"{tag_dir} was written by {record.get('world_size')} ranks, this job has {world_size}: resume with "
            "the same number of ranks, or set train.resume=never"
        )
    return None


def _file_sizes(tag_dir: Path) -> dict[str, int]:
    return {
        str(p.relative_to(tag_dir)): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE and not p.name.endswith(".tmp")
    }


def save_checkpoint(
    engine,
    checkpoint_dir: str | os.PathLike,
    tag: str,
    client_state: dict,
    rank_state: dict,
    keep: int = 0,
    files: dict[str, str] | None = None,
) -> None:
    """A checkpoint that is complete or never used; collective (every rank calls it).

    Each rank writes its extras (``rank_state``: RNG states, sampler position) as ``flexkd_rank{r}.pt`` and
    DeepSpeed its shards, without touching ``latest`` (DeepSpeed would write it from rank 0 before the other
    ranks finish). After a barrier rank 0 writes ``files`` (name -> text), records every file and its size in
    ``flexkd_complete.json``, then
    replaces ``latest`` atomically, then deletes all but the ``keep`` newest complete checkpoints (0: none).
    """
    directory = Path(checkpoint_dir)
    tag_dir = directory / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0:  # a tag saved again is not complete until this save is
        (tag_dir / COMPLETE).unlink(missing_ok=True)
    tmp = tag_dir / f".flexkd_rank{rank}.pt.tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, tag_dir / f"flexkd_rank{rank}.pt")
    barrier()
    engine.save_checkpoint(str(directory), tag=tag, client_state=client_state, save_latest=False)
    delay = float(os.environ.get(SAVE_DELAY_ENV, "0") or 0)
    if delay:
        time.sleep(delay)
    barrier()
    if rank == 0:
        for name, text in (files or {}).items():  # e.g. the config the checkpoint was trained with
            (tag_dir / name).write_text(text, encoding="utf-8")
        write_json_atomic(
            tag_dir / COMPLETE, {"tag": tag, "world_size": world, "files": _file_sizes(tag_dir)}
        )
        latest_tmp = directory / f".{LATEST}.{os.getpid()}.tmp"
        latest_tmp.write_text(tag)
        os.replace(latest_tmp, directory / LATEST)
        if keep:
            complete = [t for t in checkpoint_tags(directory) if checkpoint_problem(directory, t) is None]
            for old in [t for t in complete if t != tag][keep - 1 :]:
                shutil.rmtree(directory / old, ignore_errors=True)
                logger.info("deleted checkpoint %s (train.keep_checkpoints=%d)", old, keep)
    barrier()


def world_size_mismatch(checkpoint_dir: str | os.PathLike, world_size: int) -> str | None:
    """The problem of the newest complete checkpoint when it was written by another number of ranks (a
    resume must not fall back past it and train over it from scratch), else None."""
    for tag in checkpoint_tags(checkpoint_dir):
        if checkpoint_problem(checkpoint_dir, tag) is None:
            return checkpoint_problem(checkpoint_dir, tag, world_size)
    return None


def resumable_checkpoints(checkpoint_dir: str | os.PathLike, world_size: int) -> tuple[list[str], list[str]]:
    """(complete tags to try, newest first; one line per newer checkpoint that cannot be used and why)."""
    usable, skipped = [], []
    for tag in checkpoint_tags(checkpoint_dir):
        problem = checkpoint_problem(checkpoint_dir, tag, world_size)
        if problem is None:
            usable.append(tag)
        elif not usable:
            skipped.append(f"{tag}: {problem}")
    return usable, skipped


def load_checkpoint(engine, checkpoint_dir: str | os.PathLike, tag: str) -> tuple[dict, dict]:
    """Load a checkpoint saved by ``save_checkpoint``; returns (client_state, this rank's rank_state)."""
    load_path, client_state = engine.load_checkpoint(str(checkpoint_dir), tag=tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag!r} from {checkpoint_dir}")
    rank = dist.get_rank() if dist.is_initialized() else 0
    rank_file = Path(checkpoint_dir) / tag / f"flexkd_rank{rank}.pt"
    if not rank_file.is_file():
        raise RuntimeError(
            f"{rank_file} is missing: the checkpoint was written by a job with a different number of ranks "
            "or is incomplete; resume with the same world size or set train.resume=never"
        )
    rank_state = torch.load(rank_file, weights_only=False)
    return client_state or {}, rank_state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------------- export


def consolidated_state_dict(engine) -> dict[str, Tensor] | None:
    """Full 16-bit (or fp32 on CPU) weights of the engine's module on rank 0; None on other ranks.

    Under ZeRO-3 this gathers the partitions (needs ``stage3_gather_16bit_weights_on_model_save``); below
    stage 3 every rank already holds the full module.
    """
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if dist.get_rank() == 0 else None
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
