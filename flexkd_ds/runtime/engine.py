"""The DeepSpeed side of flexkd-ds: process group, teacher and student engines, collectives, checkpoints,
export. The only module (with the jobs it serves) that imports deepspeed or torch.distributed.

Two engines live side by side:

- the teacher, a ZeRO-3 *inference* engine (no optimizer, frozen, eval) with its own DeepSpeed config, so a
  7B teacher is sharded over all ranks whatever ZeRO stage the student uses. Its weights load sharded: an
  ``HfDeepSpeedConfig`` is kept alive while ``from_pretrained`` runs, so transformers builds the model under
  ``zero.Init`` and no rank ever holds the whole teacher;
- the student, a training engine at ZeRO stage 0-3 (optimizer, LR schedule, clipping, accumulation).

ZeRO-3 all-gathers are collective: every rank must call the teacher the same number of times in the same
order. The jobs guarantee it by padding (scoring) and by identical step counts (training).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

from flexkd_ds.runtime.ds_config import fill_batch_sizes, load_ds_config, resolve_precision, zero_stage


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> DistEnv:
    """Join (or, under a plain ``python`` start, create) the process group and pick this rank's device.

    The ``deepspeed`` launcher, ``torchrun`` and our SLURM script set RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT; without them this is a single-process job.
    """
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cuda":
        accelerator.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
    device = torch.device(
        accelerator.device_name(local_rank) if accelerator.device_name() != "cpu" else "cpu"
    )
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


def device_type() -> str:
    """'cuda', 'cpu', ... : the accelerator DeepSpeed runs on."""
    return get_accelerator().device_name()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over all ranks, in place, and return it (the ``all_reduce`` the losses take)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s python object on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj) -> list:
    """Every rank's python object, in rank order (``[obj]`` outside a multi-rank group)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    holder = [None] * dist.get_world_size()
    dist.all_gather_object(holder, obj)
    return holder


@contextlib.contextmanager
def main_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the block first (downloads, dataset caches), then the others."""
    if not env.is_main:
        barrier()
    try:
        yield
    finally:
        if env.is_main:
            barrier()


# ----------------------------------------------------------------------------------------------- configs


def deepspeed_dict(
    path: str | os.PathLike,
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    global_batch_size: int | None = None,
    dtype: str = "auto",
) -> dict:
    """A DeepSpeed config ready for ``deepspeed.initialize``: file + precision (``model.dtype``; auto = bf16
    on GPU, fp32 on CPU) + batch sizes."""
    ds_dict = resolve_precision(load_ds_config(path), device_type(), dtype)
    return fill_batch_sizes(
        ds_dict,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        world_size=world_size,
        global_batch_size=global_batch_size,
    )


def engine_dtype(ds_dict: dict) -> torch.dtype:
    """The dtype DeepSpeed keeps the module in for this config."""
    if ds_dict.get("bf16", {}).get("enabled") is True:
        return torch.bfloat16
    if ds_dict.get("fp16", {}).get("enabled") is True:
        return torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------- engines


class HeadInput:
    """Captures the input of a model's LM head on every forward: ``hidden_states[-1]`` (B, T, d).

    Reading it from the head itself (a forward pre-hook) is exact for every architecture, including those
    with a projection before the head (OPT's ``project_out``), and costs nothing: unlike
    ``output_hidden_states=True`` no other layer's output is kept.
    """

    def __init__(self, model: nn.Module) -> None:
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(
                f"{type(model).__name__} has no output embeddings (LM head) to read hidden states at"
            )
        self._value: Tensor | None = None
        self._handle = head.register_forward_pre_hook(self._store)

    def _store(self, module: nn.Module, args: tuple) -> None:
        self._value = args[0]

    def pop(self) -> Tensor:
        value, self._value = self._value, None
        if value is None:
            raise RuntimeError("the LM head did not run in the last forward; no hidden state was captured")
        return value


def build_teacher_engine(load_model: Callable[[], nn.Module], ds_dict: dict, *, sharded: bool = True):
    """A frozen ZeRO-3 inference engine around the teacher.

    ``load_model`` is called while an ``HfDeepSpeedConfig`` for ``ds_dict`` is alive, so
    ``from_pretrained`` / ``from_config`` partition the weights as they load (GGUF files are the
    exception: transformers materialises them on every rank first; ``deepspeed.initialize`` then shards).
    ``sharded=False`` (random init, see ``sharded_init``) builds the model whole; ``initialize`` shards it.
    """
    if zero_stage(ds_dict) != 3:
        raise ValueError(
            f"the teacher runs as a ZeRO-3 inference engine; its DeepSpeed config has stage {zero_stage(ds_dict)}. "
            "Point deepspeed.teacher_config at a stage-3 file such as ds_configs/teacher_zero3.json"
        )
    ds_dict = {k: v for k, v in ds_dict.items() if k not in ("optimizer", "scheduler")}
    from transformers.integrations import HfDeepSpeedConfig

    sharded_loading = HfDeepSpeedConfig(ds_dict) if sharded else None  # noqa: F841  (referenced while loading)
    model = load_model()
    model.requires_grad_(False)
    model.eval()
    engine, *_ = deepspeed.initialize(model=model, config=ds_dict)
    del sharded_loading
    engine.module.eval()
    return engine


@contextlib.contextmanager
def sharded_init(ds_dict: dict, enabled: bool = True) -> Iterator[None]:
    """Keep an ``HfDeepSpeedConfig`` alive for ZeRO-3 configs (sharded loading); a no-op otherwise.

    Pass ``enabled=False`` for a random init: under it transformers builds the model in ``zero.Init`` and
    initialises it module by module on rank 0, drawing the RNG in another order, so the same seed would give
    other weights under ZeRO-3 than under stage 0-2 (or a plain rebuild). Random models are small.
    """
    if zero_stage(ds_dict) != 3 or not enabled:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds_dict)
    try:
        yield
    finally:
        del keep


def gathered(params: list[nn.Parameter]):
    """Read-only full view of (possibly ZeRO-3 partitioned) parameters inside the block."""
    if any(hasattr(p, "ds_id") for p in params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def build_student_engine(module: nn.Module, ds_dict: dict, optimizer_factory, lr_lambda):
    """The student's training engine.

    ``optimizer_factory(params) -> torch optimizer`` is used unless the config offloads the optimizer to CPU,
    where DeepSpeed requires its own CPU Adam (built from the ``optimizer`` section we add here).
    ``lr_lambda(step) -> multiplier`` drives a ``LambdaLR`` that DeepSpeed steps at each optimizer step and
    saves in its checkpoints.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    offload = (
        ds_dict.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    )
    if offload:
        optimizer = None
    else:
        optimizer = optimizer_factory(params)

    def scheduler_factory(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    engine, *_ = deepspeed.initialize(
        model=module,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=scheduler_factory,
        config=ds_dict,
    )
    return engine


def offload_optimizer_section(lr: float, betas, eps: float, weight_decay: float) -> dict:
    """The DeepSpeed ``optimizer`` section used with ZeRO optimizer offload (DeepSpeedCPUAdam, AdamW mode)."""
    return {
        "type": "AdamW",
        "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay},
    }


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
