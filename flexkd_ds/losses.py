"""Loss functions of Flex-KD and its baselines. Pure torch: tensors in, tensors out, fp32 accumulation.

Nothing here knows about processes or ranks. Where a loss can be made exact over several data-parallel
ranks, it takes an optional ``all_reduce`` callable (``tensor -> summed tensor``) that the engine supplies.

Correlation loss (Flex-KD, DESIGN.md "The method" 3)
-----------------------------------------------------
Rows are the valid token positions of the batch. For each student unit m the teacher column ``E[m]`` and
the student column m are centred over the rows and compared by Pearson correlation::

    C_m    = <t_m - mean(t_m), s_m - mean(s_m)> / (max(||t_m - mean||, eps) * max(||s_m - mean||, eps))
    L_flex = sum_m (1 - C_m)^2

It is computed from per-column *moments* ``(n, mean_t, mean_s, M2_t, M2_s, C_ts)``, with M2 and C the
centred sums of squares and cross-products. Moments of disjoint row sets merge exactly (Chan et al.), so
the loss over a whole global batch needs two small all-reduces and never the raw
``sum(x^2) - sum(x)^2 / n``, which in fp32 returns noise for massive-activation columns (|mean| in the
hundreds, std below one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]

# Row order of the stacked moments tensor (6, d_S).
MOMENT_NAMES = ("count", "mean_t", "mean_s", "m2_t", "m2_s", "c_ts")
_N, _MT, _MS, _M2T, _M2S, _CTS = range(6)


def check_correlation_inputs(
    teacher_hidden: Tensor, student_hidden: Tensor, unit_indices: Tensor, valid_mask: Tensor | None
) -> None:
    """Raise ``ValueError`` naming the problem when the correlation inputs do not fit together.

    Shared by the torch reference and the Triton path so both refuse exactly the same inputs.
    """
    if teacher_hidden.dim() < 2 or student_hidden.dim() < 2:
        raise ValueError(
            f"teacher_hidden and student_hidden need shape (..., d); got {tuple(teacher_hidden.shape)} "
            f"and {tuple(student_hidden.shape)}"
        )
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden {tuple(student_hidden.shape)} "
            "must agree in every dimension but the last (same batch and sequence positions)"
        )
    d_teacher, d_student = teacher_hidden.shape[-1], student_hidden.shape[-1]
    if unit_indices.dim() != 1 or unit_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"unit_indices must be a 1-D integer tensor; got shape {tuple(unit_indices.shape)} "
            f"dtype {unit_indices.dtype}"
        )
    if unit_indices.numel() != d_student:
        raise ValueError(
            f"len(unit_indices) = {unit_indices.numel()} must equal the student width d_S = {d_student}"
        )
    if unit_indices.numel() > 0:
        low, high = int(unit_indices.min()), int(unit_indices.max())
        if low < 0 or high >= d_teacher:
            raise ValueError(
                f"unit_indices must lie in [0, d_T = {d_teacher}); got values in [{low}, {high}]"
            )
        if torch.unique(unit_indices).numel() != unit_indices.numel():
            raise ValueError("unit_indices contains duplicate teacher units; each unit may be selected once")
    if valid_mask is not None:
        if valid_mask.shape != teacher_hidden.shape[:-1]:
            raise ValueError(
                f"valid_mask {tuple(valid_mask.shape)} must have the shape of the hidden states without "
                f"their last dimension, {tuple(teacher_hidden.shape[:-1])}"
            )
        if valid_mask.dtype != torch.bool:
            raise ValueError(f"valid_mask must be a bool tensor; got {valid_mask.dtype}")


def accumulation_dtype(tensor: Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck, references); every other float dtype accumulates in float32."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _valid_rows(hidden: Tensor, valid_mask: Tensor | None) -> Tensor:
    """(..., d) -> (N_valid, d): the rows the correlation is taken over."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if valid_mask is None:
        return rows
    return rows[valid_mask.reshape(-1)]


def correlation_moments(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
) -> Tensor:
    """Per-column moments over the valid rows, stacked as a tensor of shape (6, d_S).

    Rows (see ``MOMENT_NAMES``): count n, mean_t, mean_s, M2_t = sum((t - mean_t)^2),
    M2_s = sum((s - mean_s)^2), C_ts = sum((t - mean_t)(s - mean_s)). Two passes (mean, then centred
    sums), float32 accumulation (float64 for float64 input). No rows gives zeros everywhere.

    Args:
        teacher_hidden: (..., d_T), any float dtype; read only at ``unit_indices``; never receives gradient.
        student_hidden: (..., d_S), any float dtype; the gradient flows back to it.
        unit_indices: (d_S,) int, teacher unit for each student unit, in rank order.
        valid_mask: (...) bool, True for rows to use; None uses every row.
    """
    acc = accumulation_dtype(student_hidden)
    teacher_rows = _valid_rows(teacher_hidden.detach(), valid_mask)[:, unit_indices].to(acc)  # (N, d_S)
    student_rows = _valid_rows(student_hidden, valid_mask).to(acc)  # (N, d_S)
    num_rows = teacher_rows.shape[0]
    count = student_rows.new_full((student_rows.shape[1],), float(num_rows))
    if num_rows == 0:
        zeros = student_rows.sum(0)  # zeros that stay attached to the graph
        return torch.stack([count, zeros, zeros, zeros, zeros, zeros])
    mean_t, mean_s = teacher_rows.mean(0), student_rows.mean(0)
    t = teacher_rows - mean_t
    s = student_rows - mean_s
    return torch.stack([count, mean_t, mean_s, (t * t).sum(0), (s * s).sum(0), (t * s).sum(0)])


def combine_moments(moments: Tensor, all_reduce: AllReduce | None = None) -> Tensor:
    """Exact merge of moments of disjoint row sets (Chan et al.).

    Args:
        moments: (P, 6, d_S) moments of P row blocks to merge here, or (6, d_S) with ``all_reduce``.
        all_reduce: ``tensor -> tensor`` summing over ranks. When given, the merge runs over ranks: every
            rank gets the global moments in value, and the gradient of its own rows in backward.

    The merged mean is used detached when centring the block means: d(M2)/d(mean) is exactly zero at the
    merged mean, so the gradient stays exact.
    """

    def total(x: Tensor) -> Tensor:  # sum over the blocks: here (dim 0) or over ranks
        return x.sum(0) if all_reduce is None else sum_with_local_grad(x, all_reduce)

    parts = moments
    n, mean_t, mean_s = parts[..., _N, :], parts[..., _MT, :], parts[..., _MS, :]
    first = total(torch.stack([n, n * mean_t, n * mean_s], dim=-2))
    count = first[0]
    safe_count = count.clamp_min(1.0)
    merged_mean_t, merged_mean_s = first[1] / safe_count, first[2] / safe_count
    dt = mean_t - merged_mean_t.detach()
    ds = mean_s - merged_mean_s.detach()
    second = total(
        torch.stack(
            [
                parts[..., _M2T, :] + n * dt * dt,
                parts[..., _M2S, :] + n * ds * ds,
                parts[..., _CTS, :] + n * dt * ds,
            ],
            dim=-2,
        )
    )
    return torch.stack([count, merged_mean_t, merged_mean_s, second[0], second[1], second[2]])


def correlation_from_moments(moments: Tensor, *, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Loss ``sum_m (1 - C_m)^2`` and the per-unit correlations ``C`` (d_S,) from (6, d_S) moments.

    Raises ``ValueError`` when fewer than 2 rows were counted.
    """
    moments = moments.to(accumulation_dtype(moments))
    num_rows = float(moments[_N, 0].detach())
    if num_rows < 2:
        raise ValueError(
            f"the correlation loss needs at least 2 valid rows (tokens) to centre over; got {int(num_rows)}"
        )
    # max(sqrt(M2), eps) written as sqrt(max(M2, eps^2)) so the gradient of sqrt never sees 0.
    norm_t = moments[_M2T].clamp_min(eps * eps).sqrt()
    norm_s = moments[_M2S].clamp_min(eps * eps).sqrt()
    corr = moments[_CTS] / (norm_t * norm_s)
    return ((1.0 - corr) ** 2).sum(), corr


def correlation_loss(
    teacher_hidden: Tensor,
    student_hidden: Tensor,
    unit_indices: Tensor,
    valid_mask: Tensor | None = None,
    *,
    eps: float = 1e-6,
    all_reduce: AllReduce | None = None,
) -> Tensor:
    """Flex-KD correlation loss ``sum_m (1 - C_m)^2`` (plain-torch reference). Returns a float32 scalar.

    Args:
        teacher_hidden: (..., d_T) teacher last hidden state, any float dtype and layout; frozen (no grad).
        student_hidden: (..., d_S) student last hidden state; gradient flows here.
        unit_indices: (d_S,) int64 selected teacher units, student unit m pairs with teacher unit
            ``unit_indices[m]``.
        valid_mask: (...) bool, the rows (tokens) to correlate over; None means all rows.
        eps: lower bound on each centred column norm (a constant column gives C = 0, not NaN).
        all_reduce: optional ``tensor -> tensor`` summing across data-parallel ranks. When given, the loss
            is the one on the union of all ranks' rows (``correlation_scope: global``): every rank returns
            the same value and its backward yields its own rows' share of the global gradient.

    Raises:
        ValueError: len(unit_indices) != d_S, an index outside [0, d_T), duplicate indices, shapes that
            disagree, or fewer than 2 valid rows (in total over ranks when ``all_reduce`` is given).
    """
    check_correlation_inputs(teacher_hidden, student_hidden, unit_indices, valid_mask)
    moments = correlation_moments(teacher_hidden, student_hidden, unit_indices, valid_mask)
    if all_reduce is not None:
        moments = combine_moments(moments, all_reduce)
    loss, _ = correlation_from_moments(moments, eps=eps)
    return loss


def sum_with_local_grad(local: Tensor, all_reduce: AllReduce) -> Tensor:
    """``all_reduce(local)`` in value, with the gradient of ``local`` (identity) in backward.

    Each rank then back-propagates d(global loss)/d(its own rows); the engine sums those over ranks.
    """
    total = all_reduce(local.detach().clone())
    return local + (total - local.detach())
