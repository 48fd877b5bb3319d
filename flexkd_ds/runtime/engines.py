"""The two DeepSpeed engines: the teacher's ZeRO-3 inference engine and the student's training engine, and the
DeepSpeed dicts they are built from.

Two engines live side by side:

- the teacher, a ZeRO-3 *inference* engine (no optimizer, frozen, eval) with its own DeepSpeed config, so a
  7B teacher is sharded over all ranks whatever ZeRO stage the student uses. Its weights load sharded: an
  ``HfDeepSpeedConfig`` is kept alive while ``from_pretrained`` runs, so transformers builds the model under
  ``zero.Init`` and no rank ever holds the whole teacher. Or, with a stage-0 config
  (``ds_configs/teacher_replicated.json``), the teacher whole on every rank: no all-gather per forward, for
  a teacher that fits beside the student (the planner prints both costs);
- the student, a training engine at ZeRO stage 0-3 (optimizer, LR schedule, clipping, accumulation).

ZeRO-3 all-gathers are collective: every rank must call the teacher the same number of times in the same
order. The jobs guarantee it by padding (scoring) and by identical step counts (training).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import deepspeed
import torch
from deepspeed.accelerator import get_accelerator
from torch import Tensor, nn

from flexkd_ds.runtime.dist import device_type
from flexkd_ds.runtime.ds_config import fill_batch_sizes, load_ds_config, resolve_precision, zero_stage

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


@contextlib.contextmanager
def call_head(head: nn.Module, replacement) -> Iterator[None]:
    """While active, ``head(x)`` runs ``replacement(head, x)`` instead of its own forward. The module's hooks
    still run around it: ZeRO-3 gathers the head's parameters before and releases them after, and
    ``HeadInput`` captures ``x``."""
    head.forward = lambda x, *args, **kwargs: replacement(head, x)
    try:
        yield
    finally:
        del head.forward


def head_skipped(model: nn.Module):
    """A forward whose logits nobody reads: the LM head returns a (..., 0) view instead of (..., V) logits."""
    return call_head(model.get_output_embeddings(), lambda head, x: x[..., :0])


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

    def remove(self) -> None:
        """Take the hook off the head and drop what it holds (a capture that is done keeps nothing alive)."""
        self._handle.remove()
        self._value = None

    def __enter__(self) -> HeadInput:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class ReplicatedTeacher:
    """The teacher whole on every rank (``ds_configs/teacher_replicated.json``, ZeRO stage 0): no partitioning,
    so no all-gather per forward. Called like the ZeRO-3 engine; ``module`` is the model."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def build_teacher_engine(load_model: Callable[[], nn.Module], ds_dict: dict, *, sharded: bool = True):
    """A frozen inference engine around the teacher: ZeRO-3 (partitioned, the default) or replicated.

    ZeRO-3: ``load_model`` is called while an ``HfDeepSpeedConfig`` for ``ds_dict`` is alive, so
    ``from_pretrained`` / ``from_config`` partition the weights as they load (GGUF files are the
    exception: transformers materialises them on every rank first; ``deepspeed.initialize`` then shards).
    ``sharded=False`` (random init, see ``sharded_init``) builds the model whole; ``initialize`` shards it.
    Stage 0: the model is loaded whole on every rank, in the config's precision, on this rank's device
    (``ReplicatedTeacher``); a teacher that fits on each GPU then costs no all-gather per micro-batch.
    """
    stage = zero_stage(ds_dict)
    if stage == 0:
        model = load_model()
        model.requires_grad_(False)
        model.eval()
        device = torch.device(get_accelerator().current_device_name())
        return ReplicatedTeacher(model.to(device=device, dtype=engine_dtype(ds_dict)))
    if stage != 3:
        raise ValueError(
            f"the teacher runs as a ZeRO-3 inference engine or replicated (stage 0); its DeepSpeed config has "
            f"stage {stage}. Point deepspeed.teacher_config at ds_configs/teacher_zero3.json (sharded) or "
            "ds_configs/teacher_replicated.json (whole on every GPU)"
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
