"""Checkpoints and export: DeepSpeed checkpoints with per-rank RNG and sampler state, and the consolidated
student weights for the Hugging Face export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from flexkd_ds.runtime.dist import barrier

# ------------------------------------------------------------------------------------------ checkpoints


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> str | None:
    """The tag DeepSpeed's ``latest`` file names, if that checkpoint exists (it is written last)."""
    latest = Path(checkpoint_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (Path(checkpoint_dir) / tag).is_dir() else None


def save_checkpoint(
    engine, checkpoint_dir: str | os.PathLike, tag: str, client_state: dict, rank_state: dict
) -> None:
    """A complete DeepSpeed checkpoint or none: per-rank extras go in first, ``latest`` is written last.

    ``rank_state`` (RNG states, sampler position) is saved per rank as ``flexkd_rank{r}.pt``; a job killed
    mid-save leaves ``latest`` on the previous complete checkpoint.
    """
    tag_dir = Path(checkpoint_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    tmp = tag_dir / f".flexkd_rank{rank}.pt.tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, tag_dir / f"flexkd_rank{rank}.pt")
    barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=True)
    barrier()


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
