"""Dispatch between the plain-torch reference (``flexkd_ds.method.losses``) and the fused Triton kernel.

``impl`` picks the implementation of the correlation moments:

- ``"torch"``: ``losses.correlation_moments`` (gather + centre + reduce in eager torch; any device, any dtype).
- ``"triton"``: ``flexkd_ds.kernels.correlation`` (fused gather + moments; CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``; float32/float16/bfloat16). ``RuntimeError`` when it cannot run here.
- ``"auto"`` (default): ``"triton"`` for CUDA tensors of a supported dtype when triton imports, else
  ``"torch"``. The environment variable ``FLEXKD_IMPL=torch|triton`` overrides ``"auto"`` (only ``"auto"``).

Both paths give the same moments, so the loss (``correlation_from_moments``) and the cross-rank merge
(``combine_moments``) are shared and the results agree to float32 rounding. Triton is imported lazily: a
CPU install without a working triton still imports this module.
"""

from __future__ import annotations

import logging
import os
from types import ModuleType

import torch
from torch import Tensor

from flexkd_ds.method import losses
from flexkd_ds.method.losses import AllReduce

logger = logging.getLogger("flexkd_ds")

IMPLS = ("auto", "torch", "triton")
ENV_VAR = "FLEXKD_IMPL"
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernel_module() -> ModuleType:
    """Import the Triton kernel module, or raise ``RuntimeError`` saying why it cannot be used."""
    try:
        from flexkd_ds.kernels import correlation
    except ImportError as error:  # triton missing or broken
        raise RuntimeError(
            f"impl='triton' needs a working triton install ({type(error).__name__}: {error}); "
            "use impl='torch'"
        ) from error
    return correlation


def _auto_choice(tensors) -> tuple[str, str]:
    """What ``impl="auto"`` runs for these tensors, and why (in words for the log)."""
    where = {f"{t.device.type} {str(t.dtype).removeprefix('torch.')}" for t in tensors}
    if not all(t.is_cuda and t.dtype in _TRITON_DTYPES for t in tensors):
        return (
            "torch",
            f"the hidden states are {', '.join(sorted(where))} (the kernel takes CUDA fp32/fp16/bf16)",
        )
    try:
        _kernel_module()
    except RuntimeError as error:
        return "torch", f"the Triton kernel cannot be used: {error.__cause__ or error}"
    return "triton", "CUDA hidden states and a working Triton install"


_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(impl: str, why: str) -> None:
    """Say once per process (rank 0 only) which correlation implementation ``auto`` runs and why; a fallback
    from a CUDA run to torch is a warning."""
    if (impl, why) in _ANNOUNCED:
        return
    _ANNOUNCED.add((impl, why))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return
    level = logging.WARNING if "cannot be used" in why else logging.INFO
    logger.log(level, "loss.impl=auto: the Flex-KD correlation runs on %s: %s", impl, why)


def resolve_impl(impl: str, tensor: Tensor, *more: Tensor) -> str:
    """Return ``"torch"`` or ``"triton"`` for inputs like ``tensor`` (and ``more``): device and dtype.

    ``"auto"`` picks ``"triton"`` only when every given tensor is a CUDA tensor of a dtype the kernel takes.

    Raises:
        ValueError: ``impl`` (or ``$FLEXKD_IMPL`` under ``"auto"``) is not one of ``IMPLS``.
        RuntimeError: ``"triton"`` was asked for and cannot run: triton does not import, or the tensor is
            on CPU and the kernels were not built for the interpreter (``TRITON_INTERPRET=1`` must be set
            before the kernel module is first imported).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}; got {impl!r}")
    if impl == "auto":
        override = os.environ.get(ENV_VAR, "").strip().lower()
        if override and override not in IMPLS:
            raise ValueError(f"${ENV_VAR} must be one of {IMPLS}; got {override!r}")
        impl = override or "auto"
    if impl == "auto":
        impl, why = _auto_choice((tensor, *more))
        _announce(impl, why)
        return impl
    if impl == "triton":
        kernels = _kernel_module()
        if not tensor.is_cuda and not (tensor.device.type == "cpu" and kernels.INTERPRETED):
            raise RuntimeError(
                f"impl='triton' got {tensor.device.type} tensors: the kernels run on CUDA, or on CPU only when "
                "TRITON_INTERPRET=1 was set before flexkd_ds.kernels.correlation was imported"
            )
    return impl


def correlation_moments(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
    *,
    impl: str = "auto",
) -> Tensor:
    """Per-column moments (6, d_S) over the valid rows, as ``losses.correlation_moments``, from ``impl``.

    For callers that merge across ranks themselves (``losses.combine_moments``). The Triton path checks
    its inputs (``losses.check_correlation_inputs``); it must, since a bad index would read out of bounds.
    """
    if resolve_impl(impl, student_hidden, teacher_hidden) == "torch":
        return losses.correlation_moments(teacher_hidden, student_hidden, unit_indices, valid_mask)
    return _kernel_module().correlation_moments_triton(
        teacher_hidden, student_hidden, unit_indices, valid_mask
    )


def correlation_loss(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
    *,
    eps: float = 1e-6,
    all_reduce: AllReduce | None = None,
    impl: str = "auto",
    units_checked: bool = False,
    check_rows: bool = True,
) -> Tensor:
    """Flex-KD correlation loss ``sum_m (1 - C_m)^2``: ``losses.correlation_loss`` with a choice of ``impl``.

    ``units_checked`` / ``check_rows`` (the trainer: its selection is checked once, before training) skip the
    checks that read device values on the host; see ``losses.check_correlation_inputs`` and
    ``losses.correlation_from_moments``.

    Same arguments, errors and result as ``losses.correlation_loss`` (see there); ``impl`` is resolved by
    ``resolve_impl`` from the two hidden states. The inputs are checked once, before dispatch, so both paths
    raise the same ``ValueError`` for bad inputs.
    """
    losses.check_correlation_inputs(
        teacher_hidden, student_hidden, unit_indices, valid_mask, units_checked=units_checked
    )
    impl = resolve_impl(impl, student_hidden, teacher_hidden)
    if impl == "torch":
        moments = losses.correlation_moments(teacher_hidden, student_hidden, unit_indices, valid_mask)
    else:
        moments = _kernel_module().correlation_moments_triton(
            teacher_hidden, student_hidden, unit_indices, valid_mask, validate=False
        )
    if all_reduce is not None:
        moments = losses.combine_moments(moments, all_reduce)
    loss, _ = losses.correlation_from_moments(moments, eps=eps, check_rows=check_rows)
    return loss
